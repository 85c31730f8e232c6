"""Execute the notebooks into the book (papermill) and render it (jupyter-book 1.x, strict).

``execute`` runs every ``notebooks/NN_*.ipynb`` with the profile's parameters into
``book/notebooks/`` and stamps each with its provenance (profile, parameters, run time, package
versions). A failing notebook stops the pipeline with a message naming the notebook and the cell,
and never replaces the book's copy. ``render`` writes the provenance page from those stamps,
copies MathJax for offline math and builds the HTML with warnings as errors; the book itself never
executes code (``execute_notebooks: off``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
BOOK_DIR = ROOT / "book"
EXECUTED_DIR = BOOK_DIR / "notebooks"
SMOKE_DIR = BOOK_DIR / "_build" / "smoke-notebooks"  # smoke executions never replace the book's pages
PROVENANCE_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "pyro-ppl", "papermill",
                       "jupyter-book", "numpy", "matplotlib", "tvae_core")


class NotebookFailed(RuntimeError):
    pass


def source_notebooks(pretrained: bool = False) -> list[Path]:
    """The book's source notebooks; ``pretrained``: those of ``notebooks/pretrained/`` instead,
    which need the pretrained weights (``make pretrained``) and ~26 minutes on 2 cores, so
    ``make book`` leaves their committed pages alone and ``make book-pretrained`` re-executes them."""
    folder = NOTEBOOKS_DIR / "pretrained" if pretrained else NOTEBOOKS_DIR
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def execute_notebook(source: Path, output: Path, profile: str, kernel: str | None = None,
                     extra_parameters: dict | None = None) -> float:
    """Run one notebook with papermill; raise :class:`NotebookFailed` naming notebook and cell."""
    import nbformat
    import papermill

    parameters = {"profile": profile, "show_progress": True, **(extra_parameters or {})}
    accepted = papermill.inspect_notebook(str(source))
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:  # papermill would only log them and run with the defaults
        raise ValueError(f"{source.name}: unknown parameter(s) {unknown}; accepted parameters: {tuple(accepted)}")
    tmp = output.with_name(output.stem + ".running.ipynb")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        papermill.execute_notebook(str(source), str(tmp), parameters=parameters, kernel_name=kernel,
                                   cwd=str(ROOT), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as err:
        raise NotebookFailed(f"notebook {source.name} failed in cell {err.cell_index} "
                             f"(execution count {err.exec_count}): {err.ename}: {err.evalue}") from None
    seconds = time.time() - started
    nb = relative_paths(nbformat.read(str(tmp), as_version=4), ROOT)
    nb.metadata["tvae_provenance"] = {
        "profile": profile, "parameters": nb.metadata.get("papermill", {}).get("parameters", parameters),
        "seconds": round(seconds, 1), "executed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(), "machine": machine_description(),
        "compute": compute_paths(),
    }
    nbformat.write(nb, str(tmp))
    os.replace(tmp, output)
    return seconds


def machine_description() -> str:
    """Architecture, processor model and core count. The model matters: the same runs gave other
    numbers on an Intel Xeon and an AMD EPYC (both read AVX512 as torch's CPU capability), most
    likely because bfloat16 matmuls take other kernels with and without AMX."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return ", ".join(part for part in (platform.machine(), model, f"{os.cpu_count()} CPU cores") if part)


def relative_paths(nb, root: Path):
    """``nb`` with the build machine's checkout folder left out of what it stores: papermill's
    input and output paths in the metadata, and the text of stream outputs (warnings and log lines
    name files under the checkout, its virtual environment included). A page then reads the same
    on every machine; nothing that was computed changes."""
    prefix = str(root).rstrip("/") + "/"
    meta = nb.metadata.get("papermill", {})
    for name in ("input_path", "output_path"):
        if isinstance(meta.get(name), str):
            meta[name] = meta[name].replace(prefix, "")
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "stream":
                text = output.get("text", "")
                text = "".join(text) if isinstance(text, list) else text
                output["text"] = text.replace(prefix, "")
    return nb


def compute_paths() -> dict[str, str]:
    """The machine-dependent code paths this process takes (the notebooks' kernels inherit its
    environment). The LM head's two paths differ by ~2e-6 nats per token; the allocator's setting
    changes no number, only the time."""
    import torch

    from . import native
    from .allocator import child_environment
    from .device import HEAD_DTYPE_ENV, cpu_head_dtype

    why = f"{HEAD_DTYPE_ENV}=float32" if os.environ.get(HEAD_DTYPE_ENV) else "this CPU has no bfloat16 in hardware"
    head = native.describe() if cpu_head_dtype() == "bfloat16" else \
        f"not used: the CPU profiles' LM head is float32 ({why})"
    # the kernels start with child_environment() (execute_all)
    return {"torch CPU capability": torch.backends.cpu.get_cpu_capability(),
            "LM head in bfloat16 evaluation": head,
            "malloc": "glibc, freed memory kept (tvae_core.allocator)" if child_environment() else "the system's defaults"}


def _previous_seconds(source: Path) -> float:
    """How long the last execution of ``source`` took (its provenance stamp), 0 if unknown."""
    import json

    try:
        stamp = json.loads((EXECUTED_DIR / source.name).read_text())["metadata"]["tvae_provenance"]
        return float(stamp["seconds"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0.0


def output_dir_for(profile: str) -> Path:
    """Where ``execute`` writes: the book's pages, except for the smoke profile (a check, not a
    result), which goes to ``book/_build/smoke-notebooks/``."""
    return SMOKE_DIR if profile == "smoke" else EXECUTED_DIR


def parse_parameters(text: str) -> dict:
    """``"target_rates=[2,6] seed=1"`` -> ``{"target_rates": [2, 6], "seed": 1}``: the ``PARAMS``
    of ``make execute``. Values are YAML (numbers, true/false, lists, quoted or bare strings), as in
    ``papermill -y``; names must be parameters of the notebooks (:func:`execute_all` refuses a name
    that none of the notebooks it runs declares)."""
    import shlex

    import yaml

    parameters = {}
    for item in shlex.split(text or ""):
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"PARAMS item {item!r} is not accepted; accepted form: name=value, e.g. target_rates=[2,6]")
        parameters[name] = yaml.safe_load(value) if value else ""
    return parameters


def execute_all(profile: str, kernel: str | None = None, only: list[str] | None = None,
                workers: int = 1, pretrained: bool = False, parameters: dict | None = None) -> int:
    """Execute the source notebooks into :func:`output_dir_for` ``(profile)``, ``workers`` at a
    time (each in its own kernel, longest first by the last run's time). With several workers
    every kernel gets one torch thread (``OMP_NUM_THREADS=1``): on 2 cores two 1-thread notebooks
    side by side beat one 2-thread notebook after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from .allocator import child_environment

    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    notebooks = [nb for nb in source_notebooks(pretrained)
                 if not only or any(nb.stem.startswith(o) for o in only)]
    notebooks.sort(key=_previous_seconds, reverse=True)
    declared = {nb: _declared_parameters(nb) for nb in notebooks} if parameters else {}
    if parameters:   # a misspelt name would otherwise re-run the default pages without a word
        # runs_dir comes from make's RUNS_DIR for every page; a page without runs has no use for it
        accepted = {"runs_dir"}.union(*declared.values())
        unknown = sorted(set(parameters) - accepted)
        if unknown:
            raise ValueError(f"PARAMS {unknown}: declared by none of the notebooks {[nb.stem for nb in notebooks]}; "
                             f"accepted names: {sorted(accepted)}")
    output = output_dir_for(profile)
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by every kernel
    os.environ.update(child_environment())   # tvae_core.allocator's setting, from each kernel's start
    failures = []
    total = time.time()

    def run(source: Path) -> None:
        print(f"[execute] {source.name} (profile={profile}) ...", flush=True)
        try:
            seconds = execute_notebook(source, output / source.name, profile, kernel,
                                       _known_parameters(source, parameters, declared.get(source)))
            print(f"[execute] {source.name}: {seconds:.1f} s", flush=True)
        except NotebookFailed as err:
            print(f"[execute] FAILED: {err}", file=sys.stderr, flush=True)
            failures.append(str(err))
            (output / (source.stem + ".running.ipynb")).unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, notebooks))
    failures.sort()
    print(f"[execute] {len(notebooks) - len(failures)}/{len(notebooks)} notebooks in {time.time() - total:.1f} s "
          f"into {output}")
    if failures:
        print("\n".join(["[execute] failures:"] + failures), file=sys.stderr)
        return 1
    return 0


def _known_parameters(source: Path, parameters: dict | None, declared: set[str] | None = None) -> dict:
    """The ``parameters`` that ``source`` declares (``declared``: its names, when already read):
    ``PARAMS='target_rates=[2,6]'`` applies to the notebooks that have target rates and leaves the
    others alone."""
    if not parameters:
        return {}
    declared = _declared_parameters(source) if declared is None else declared
    return {k: v for k, v in parameters.items() if k in declared}


def _declared_parameters(source: Path) -> set[str]:
    """The names in ``source``'s parameters cell (papermill's reading of it)."""
    import papermill

    return set(papermill.inspect_notebook(str(source)))


def write_provenance_page() -> Path:
    """book/provenance.md: per executed notebook its profile, parameters, run time, code paths
    (:func:`compute_paths`) and versions."""
    import nbformat

    lines = ["# Provenance", "",
             "Every chapter of this book (a notebook) was executed by papermill (`make execute`) before "
             "rendering; the book itself never runs code. This page is generated from the stamps that "
             "execution left in each notebook's metadata.", ""]
    for path in sorted(EXECUTED_DIR.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        stamp = nb.metadata.get("tvae_provenance")
        lines += [f"## `{path.stem}`", ""]
        if not stamp:
            lines += ["No provenance stamp: this notebook was not executed by `make execute`.", ""]
            continue
        lines += [f"- profile: `{stamp['profile']}`", f"- executed: {stamp['executed_at']} on {stamp['machine']}",
                  f"- run time: {stamp['seconds']:.1f} s (runs loaded from the cache count as loading time)"]
        lines += [f"- {k}: {v}" for k, v in stamp.get("compute", {}).items()]
        lines += ["", "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | `{v!r}` |" for k, v in stamp["parameters"].items()]
        lines += ["", "| package | version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in stamp["versions"].items()]
        lines += [""]
    out = BOOK_DIR / "provenance.md"
    out.write_text("\n".join(lines))
    return out


def copy_mathjax() -> Path:
    """MathJax 2.7 from the PyPI package jupyter-server-mathjax into book/_mathjax/mathjax, published
    at the root of the HTML (``html_extra_path``) so math renders without internet and from pages
    opened from disk. (Not under ``_static``: jupyter-book adds every .js file found there to
    every page.)"""
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax for offline math needs `pip install --no-deps jupyter-server-mathjax==0.2.6` "
                           "(done by `make install`)")
    source = Path(list(spec.submodule_search_locations)[0]) / "static"
    target = BOOK_DIR / "_mathjax" / "mathjax"
    if not (target / "MathJax.js").is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    return target


def render(strict: bool = True) -> int:
    write_provenance_page()
    copy_mathjax()
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(BOOK_DIR), "--builder", "html"]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode == 0:
        print(f"[render] book written to {BOOK_DIR / '_build' / 'html' / 'index.html'}")
    return result.returncode


def main(argv=None) -> int:
    """``python -m tvae_core.book [--profile P] [--only 02 03] [--params "k=v ..."]``: what
    ``make execute`` runs (``ONLY``, ``PARAMS``, ``RUNS_DIR``)."""
    import argparse

    from .profiles import PROFILE_NAMES

    parser = argparse.ArgumentParser(prog="python -m tvae_core.book", description=main.__doc__)
    parser.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="notebook prefixes, e.g. 00 03")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--params", default="", help='notebook parameters, e.g. "target_rates=[2,6] seed=1"')
    args = parser.parse_args(argv)
    try:
        parameters = parse_parameters(args.params)
        return execute_all(args.profile, args.kernel, args.only, args.workers, args.pretrained, parameters)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
