"""Bad parameters and inputs fail early, with a message that names the parameter and what it accepts."""
import json

import pytest
import torch

from tvae_core.config import DataConfig, ModelConfig, ObjectiveConfig, TrainConfig
from tvae_core.data import CorpusError, read_text_file
from tvae_core.estimators import evaluate_log_likelihood, iw_log_likelihood
from tvae_core.experiments import method_config
from tvae_core.notebook import check_parameters
from tvae_core.objectives import free_bits_rate
from tvae_core.profiles import get_profile


def _non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok\n".encode("utf-8") + "na\u00efve".encode("latin-1"))
    return read_text_file(path)


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return read_text_file(path)


class _Model:
    latent_dim = 2


CASES = [
    ("unknown objective", lambda t: ObjectiveConfig(name="elbo++"), ValueError, r"objective\.name.*'vae'"),
    ("unknown free-bits variant", lambda t: ObjectiveConfig(name="fb", target_rate=4, free_bits_variant="dim"),
     ValueError, r"free_bits_variant.*example_dim"),
    ("free-bits variant at call time", lambda t: free_bits_rate(torch.zeros(2, 2), 1.0, "per_dim"), ValueError,
     "batch_dim"),
    ("unknown injection", lambda t: ModelConfig(injection="cross_attention"), ValueError, r"injection.*memory"),
    ("unknown pooling", lambda t: ModelConfig(pooling="last"), ValueError, r"pooling.*mean"),
    ("unknown profile", lambda t: get_profile("huge"), ValueError, r"profile.*smoke"),
    ("negative target rate", lambda t: ObjectiveConfig(name="mdr", target_rate=-1.0), ValueError, "target_rate"),
    ("non-finite target rate", lambda t: ObjectiveConfig(name="fb", target_rate=float("inf")), ValueError,
     "target_rate"),
    ("missing target rate", lambda t: ObjectiveConfig(name="mdr"), ValueError, "target_rate is required"),
    ("latent_dim < 1", lambda t: ModelConfig(latent_dim=0), ValueError, r"latent_dim.*>= 1"),
    ("heads do not divide hidden", lambda t: ModelConfig(hidden_size=30, num_heads=4), ValueError, "num_heads"),
    ("encoder depth 0", lambda t: ModelConfig(encoder_layers=0), ValueError, r"model\.encoder_layers"),
    ("encoder depth for a pretrained encoder", lambda t: ModelConfig(encoder="some/bert", encoder_layers=1),
     ValueError, r"model\.encoder_layers.*accepted value None"),
    ("word dropout outside [0,1]", lambda t: ModelConfig(word_dropout=1.5), ValueError, "word_dropout"),
    ("K < 1", lambda t: iw_log_likelihood(_Model(), {}, num_samples=0), ValueError, "num_samples"),
    ("K given as a bool", lambda t: evaluate_log_likelihood(_Model(), [], num_samples=True), (TypeError, ValueError),
     "num_samples"),
    ("empty corpus", _empty, CorpusError, "empty"),
    ("non-UTF-8 corpus", _non_utf8, CorpusError, "line 2"),
    ("text source without path", lambda t: DataConfig(source="text"), ValueError, r"data\.path"),
    ("unknown data source", lambda t: DataConfig(source="wikipedia"), ValueError, r"data\.source.*ptb"),
    ("non-positive learning rate", lambda t: TrainConfig(learning_rate=0.0), ValueError, "learning_rate"),
    ("batch size 0", lambda t: TrainConfig(batch_size=0), ValueError, "batch_size"),
    ("unknown LM-head dtype", lambda t: TrainConfig(lm_head_dtype="float16"), ValueError,
     r"train\.lm_head_dtype.*'bfloat16'"),
    ("unknown method", lambda t: method_config("VAE++", "smoke"), ValueError, r"method.*'MDR'"),
    ("targeted method without rate", lambda t: method_config("FB", "smoke"), ValueError, "target_rate"),
    ("MMD without bandwidths",
     lambda t: __import__("tvae_core.estimators.mmd", fromlist=["x"]).mmd2_unbiased(torch.zeros(3, 2), torch.ones(3, 2),
                                                                                  bandwidths=[]),
     ValueError, r"bandwidths=\[\].*non-empty"),
    ("string where a number is expected", lambda t: ObjectiveConfig(beta="0.5"), ValueError,
     r"objective\.beta='0\.5'.*a number"),
    ("bool where a fraction is expected", lambda t: ModelConfig(dropout=True), ValueError, r"model\.dropout=True"),
    ("bool target rate", lambda t: ObjectiveConfig(name="fb", target_rate=True), ValueError, r"target_rate=True"),
    ("string weight decay", lambda t: TrainConfig(weight_decay="0.1"), ValueError, r"train\.weight_decay"),
    ("zero threads", lambda t: TrainConfig(num_threads=0), ValueError, r"train\.num_threads"),
    ("papermill parameter of the wrong type",
     lambda t: check_parameters({"__annotations__": {"seed": int}, "seed": "0"}), TypeError, r"seed=.*expected"),
    ("papermill float where int expected",
     lambda t: check_parameters({"__annotations__": {"seed": int}, "seed": 1.5}), TypeError, "seed"),
    ("papermill unknown profile",
     lambda t: check_parameters({"__annotations__": {"profile": str}, "profile": "big"}), ValueError,
     r"profile.*smoke"),
]


@pytest.mark.parametrize("name,call,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_early_and_names_the_parameter(tmp_path, name, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


def test_cli_rejects_bad_parameters_with_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tvae_core", "train", "--objective", "mdr"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "target_rate" in result.stderr and "Traceback" not in result.stderr


def _main(capsys, *argv):
    """The CLI in this process: (exit code, stderr)."""
    from tvae_core.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _config_file(tmp_path, change):
    from helpers import tiny_config, write_corpus

    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt")).to_dict()
    change(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


CLI_CASES = [
    ("unknown key in a section", lambda t: ["train", "--config", _config_file(t, lambda c: c["model"].update(depth=3))],
     r"model\.depth.*accepted keys"),
    ("missing section", lambda t: ["train", "--config", _config_file(t, lambda c: c.pop("train"))],
     r"\['train'\] missing"),
    ("unknown top-level key", lambda t: ["train", "--config", _config_file(t, lambda c: c.update(optimiser={}))],
     r"optimiser.*accepted keys"),
    ("beta as a string", lambda t: ["train", "--config", _config_file(t, lambda c: c["objective"].update(beta="2"))],
     r"objective\.beta"),
    ("logvar bound as a string",
     lambda t: ["train", "--config", _config_file(t, lambda c: c["model"].update(logvar_bound="10"))],
     r"model\.logvar_bound"),
    ("dropout true", lambda t: ["train", "--config", _config_file(t, lambda c: c["model"].update(dropout=True))],
     r"model\.dropout"),
    ("target rate true",
     lambda t: ["train", "--config", _config_file(t, lambda c: c["objective"].update(name="fb", target_rate=True))],
     r"objective\.target_rate"),
    ("missing config file", lambda t: ["train", "--config", str(t / "nope.json")], r"--config .*not found"),
    ("config not JSON", lambda t: ["train", "--config", str((t / "x.json").write_text("{") and t / "x.json")],
     r"--config .*not valid JSON"),
    ("config is a list", lambda t: ["train", "--config", str((t / "x.json").write_text("[]") and t / "x.json")],
     r"JSON object"),
    ("flags next to --config", lambda t: ["train", "--config", _config_file(t, lambda c: None), "--seed", "3"],
     r"--seed cannot be combined with --config"),
    ("target rate with the plain VAE", lambda t: ["train", "--target-rate", "4"], r"--target-rate does not apply"),
    ("beta with the plain VAE", lambda t: ["train", "--beta", "0.5"], r"--beta does not apply.*beta_vae"),
    ("MDR step with the plain VAE", lambda t: ["train", "--mdr-lr", "0.1"], r"--mdr-lr does not apply.*mdr"),
    ("free-bits variant with MDR", lambda t: ["train", "--objective", "mdr", "--target-rate", "4",
                                              "--free-bits-variant", "total"], r"--free-bits-variant does not apply"),
    ("missing corpus", lambda t: ["train", "--corpus", str(t / "none.txt")], r"--corpus .*not found"),
    ("zero threads", lambda t: ["train", "--threads", "0", "--profile", "smoke"], r"train\.num_threads"),
    ("fp8", lambda t: ["train", "--mixed-precision", "fp8", "--profile", "smoke"], r"train\.mixed_precision.*bf16"),
    ("zero micro-batches", lambda t: ["train", "--gradient-accumulation-steps", "0", "--profile", "smoke"],
     r"train\.gradient_accumulation_steps"),
    ("train-all with -1 threads", lambda t: ["train-all", "--threads", "-1"], r"--threads -1.*>= 1"),
    ("train-all with 0 workers", lambda t: ["train-all", "--workers", "0"], r"--workers 0.*>= 1"),
    ("a nonexistent encoder path",
     lambda t: ["train", "--config", _config_file(t, lambda c: c["model"].update(encoder=str(t / "no-encoder"))),
                "--runs-dir", str(t / "runs")], r"no-encoder"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("fp16 on a CPU", lambda t: ["train", "--runs-dir", str(t / "runs"), "--config", _config_file(
        t, lambda c: c["train"].update(mixed_precision="fp16"))], r"mixed_precision='fp16' needs a CUDA GPU"))


@pytest.mark.parametrize("name,argv,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, name, argv, match):
    import re

    monkeypatch.setattr("tvae_core.data.DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    code, err = _main(capsys, *argv(tmp_path))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), err


def test_an_unknown_notebook_parameter_is_refused_before_running(tmp_path):
    from tvae_core.book import ROOT, execute_notebook

    source = ROOT / "notebooks" / "00_exact_vae.ipynb"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sede'\]; accepted parameters: .*'seed'"):
        execute_notebook(source, tmp_path / "out.ipynb", "smoke", extra_parameters={"sede": 1})
    assert not (tmp_path / "out.ipynb").exists()


def test_the_console_script_is_the_cli_entry_point():
    import tomllib
    from pathlib import Path

    from tvae_core import cli

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    module, function = project["project"]["scripts"]["tvae"].split(":")
    assert module == "tvae_core.cli" and getattr(cli, function) is cli.main


def test_a_profile_is_run_config_overrides_and_a_bad_one_fails_naming_it():
    from dataclasses import replace

    from tvae_core.config import RunConfig
    from tvae_core.profiles import get_profile

    smoke = get_profile("smoke")
    base = smoke.base_config(seed=3)
    assert base.train.seed == 3 and base.model.latent_dim == smoke.model.latent_dim == 8
    assert base.data.max_length == smoke.run["data"]["max_length"] and base.objective.name == "vae"
    # fields the profile leaves alone are RunConfig's defaults, nothing mirrored
    assert base.train.learning_rate == RunConfig().train.learning_rate
    assert base.train.lr_warmup_steps == 3   # no warm-up given: a tenth of its 30 steps
    with pytest.raises(ValueError, match=r"sections \['objective'\].*accepted values"):
        replace(smoke, run={**smoke.run, "objective": {"name": "mdr"}})
    with pytest.raises(TypeError, match="max_step"):
        replace(smoke, run={**smoke.run, "train": {"max_step": 3}})
    with pytest.raises(ValueError, match="train.batch_size"):
        replace(smoke, run={**smoke.run, "train": {"batch_size": 0}})
