"""A cache that never serves a wrong result: run keys cover corpus and code; every cache entry
(run, checkpoint, evaluation, posterior, tokenised corpus) is verified on load, and a damaged copy
is set aside with one warning naming the file and rebuilt to the same numbers; nothing
non-finite is published; leftovers of killed processes are removed; concurrent identical runs
train once; the thread count belongs to the run.

One small run (and its evaluation, checkpoints and corpus cache) is built once per module; every
damage case works on a copy of it."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, write_corpus
from tvae_core import train as train_module
from tvae_core.cache import read_checked_json, write_checked_json
from tvae_core.data import _corpus_key, load_corpus
from tvae_core.evaluation import evaluate_run
from tvae_core.profiles import get_profile
from tvae_core.runs import is_valid_run, load_run, train_or_load

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMOKE = get_profile("smoke")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Corpus, two finished runs (seeds 0 and 1) with evaluations, the checkpoints of the first
    (steps 4 and 8 of 12) and a tokenised-corpus cache."""
    base = tmp_path_factory.mktemp("built")
    corpus = write_corpus(base / "corpus.txt")
    cfg = tiny_config(corpus, "mdr", 2.0, max_steps=12, checkpoint_every=4)
    other = tiny_config(corpus, "mdr", 2.0, max_steps=12, checkpoint_every=4, seed=1)
    runs = base / "runs"
    write = train_module._write_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill right before the run is written: checkpoints stay

    train_module._write_run = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.train(cfg, base / "unwritten", runs / f"{cfg.key}.partial", progress=False)
    finally:
        train_module._write_run = write
    shutil.copytree(runs / f"{cfg.key}.partial", base / "partial")
    run = train_or_load(cfg, runs, progress=False)
    other_run = train_or_load(other, runs, progress=False)
    evaluation = evaluate_run(run, SMOKE.estimators, progress=False)
    evaluate_run(other_run, SMOKE.estimators, progress=False)
    load_corpus(cfg.data, seed=0, cache_dir=base / "corpus-cache")
    load_corpus(other.replace(data={"vocab_size": 10}).data, seed=0, cache_dir=base / "corpus-cache")
    return {"base": base, "corpus": corpus, "cfg": cfg, "other": other, "run": run, "other_run": other_run,
            "evaluation": evaluation}


def _copy_runs(built, tmp_path) -> Path:
    target = tmp_path / "runs"
    shutil.copytree(built["base"] / "runs", target, ignore=shutil.ignore_patterns("*.partial", "_locks"))
    return target


def _flip_bits(path, count=64):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) - 1 - 13 * i] ^= 0x10  # the last tensors: the output layer
    path.write_bytes(bytes(data))


def _rewrite_tensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _nan_weights(t):
    name = sorted(k for k in t if t[k].is_floating_point())[0]
    t[name] = torch.full_like(t[name], float("nan"))


def _missing_tensor(t):
    del t[sorted(t)[-1]]


def _relabel_other_run(path, built):
    shutil.rmtree(path)
    shutil.copytree(built["other_run"].path, path)
    (path / "config.json").write_text(json.dumps(built["cfg"].to_dict()))


RUN_DAMAGE = {
    "64 flipped bits in the weights": ("model.safetensors", lambda p, b: _flip_bits(p / "model.safetensors")),
    "another run's weights": ("model.safetensors", lambda p, b: shutil.copy(b["other_run"].path / "model.safetensors",
                                                                            p / "model.safetensors")),
    "NaN weights": ("model.safetensors", lambda p, b: _rewrite_tensors(p / "model.safetensors", _nan_weights)),
    "a missing tensor": ("model.safetensors", lambda p, b: _rewrite_tensors(p / "model.safetensors",
                                                                           _missing_tensor)),
    "another run relabelled with this config": ("manifest.json", _relabel_other_run),  # its manifest names its key
    "metrics null": ("metrics.json", lambda p, b: (p / "metrics.json").write_text('{"rate": null}')),
    "metrics NaN": ("metrics.json", lambda p, b: (p / "metrics.json").write_text('{"rate": NaN, "elbo": 1}')),
    "meta.json is a list": ("meta.json", lambda p, b: (p / "meta.json").write_text("[]")),
    "truncated tokenizer.json": ("tokenizer.json", lambda p, b: (p / "tokenizer.json").write_text(
        (p / "tokenizer.json").read_text()[:100])),
    "missing manifest": ("manifest.json", lambda p, b: (p / "manifest.json").unlink()),
}


@pytest.mark.parametrize("case", RUN_DAMAGE, ids=list(RUN_DAMAGE))
def test_a_damaged_run_is_set_aside_with_one_warning_and_retrained(built, tmp_path, caplog, case):
    file, damage = RUN_DAMAGE[case]
    runs, cfg = _copy_runs(built, tmp_path), built["cfg"]
    damage(runs / cfg.key, built)
    assert not is_valid_run(cfg, runs)  # what train-all counts: a damaged folder is not a trained run
    with caplog.at_level("WARNING", logger="tvae_core"):
        run = train_or_load(cfg, runs, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and file in warnings[0], warnings
    assert (runs / f"{cfg.key}.damaged-0").is_dir()
    assert run.metrics == built["run"].metrics and run.weights_sha256 == built["run"].weights_sha256


def _resign(path, key, change):
    """Damage an evaluation's payload and recompute its checksum, as a consistent writer would:
    the content checks must still refuse it."""
    payload = read_checked_json(path, key)
    change(payload)
    write_checked_json(path, payload, key)


def _posterior(tensor_path, json_path, key, change):
    from safetensors.torch import load_file, save_file

    from tvae_core.cache import sha256_file

    tensors = load_file(str(tensor_path))
    change(tensors)
    save_file(tensors, str(tensor_path))
    _resign(json_path, key, lambda p: p.update(posterior_sha256=sha256_file(tensor_path)))


def _evaluation_damage(name, json_path, tensor_path, key, built):
    other = built["other_run"].path
    if name == "edited value":
        json_path.write_text(json_path.read_text().replace('"rate": ', '"rate": 1', 1))
    elif name == "wrong type (re-signed)":
        _resign(json_path, key, lambda p: p["result"].update(rate="abc"))
    elif name == "another run's evaluation":
        (other_json,) = other.glob("evaluation-*.json")
        shutil.copy(other_json, json_path)
    elif name == "another run's evaluation, re-signed":
        (other_json,) = other.glob("evaluation-*.json")
        payload = json.loads(other_json.read_text())["payload"]
        write_checked_json(json_path, payload, key)
    elif name == "posterior of the wrong shape (re-signed)":
        _posterior(tensor_path, json_path, key, lambda t: t.update(loc=t["loc"][:-1], scale=t["scale"][:-1]))
    elif name == "NaN posterior (re-signed)":
        _posterior(tensor_path, json_path, key, lambda t: t["loc"].fill_(float("nan")))
    elif name == "negative scales (re-signed)":
        _posterior(tensor_path, json_path, key, lambda t: t["scale"].neg_())
    elif name == "posterior bytes changed":
        _flip_bits(tensor_path, 8)


EVALUATION_DAMAGE = ["edited value", "wrong type (re-signed)", "another run's evaluation",
                     "another run's evaluation, re-signed", "posterior of the wrong shape (re-signed)",
                     "NaN posterior (re-signed)", "negative scales (re-signed)", "posterior bytes changed"]


@pytest.mark.parametrize("case", EVALUATION_DAMAGE)
def test_a_damaged_evaluation_is_set_aside_and_recomputed(built, tmp_path, caplog, case):
    runs, cfg = _copy_runs(built, tmp_path), built["cfg"]
    run = load_run(cfg, runs)
    (json_path,) = run.path.glob("evaluation-*.json")
    key = json_path.stem[len("evaluation-"):]
    tensor_path = run.path / f"posterior-{key}.safetensors"
    _evaluation_damage(case, json_path, tensor_path, key, built)
    with caplog.at_level("WARNING", logger="tvae_core"):
        again = evaluate_run(run, SMOKE.estimators, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all(key in w for w in warnings), warnings
    assert dataclasses.replace(again, seconds=0) == dataclasses.replace(built["evaluation"], seconds=0)
    assert list(run.path.glob("*.damaged-0"))
    stored = read_checked_json(json_path, key)  # the recomputed entry records where it came from
    assert stored["run_key"] == cfg.key and stored["weights_sha256"] == run.weights_sha256


def _corpus_damage(name, folder, other):
    if name == "changed ids":
        arrow = sorted((folder / "train").glob("*.arrow"))[0]
        _flip_bits(arrow, 4)
    elif name == "another config's corpus":
        shutil.rmtree(folder / "train")
        shutil.copytree(other / "train", folder / "train")
    elif name == "truncated tokenizer.json":
        (folder / "tokenizer.json").write_text("{")


@pytest.mark.parametrize("case", ["changed ids", "another config's corpus", "truncated tokenizer.json"])
def test_a_damaged_tokenised_corpus_is_set_aside_and_rebuilt(built, tmp_path, caplog, case):
    cache = tmp_path / "corpus-cache"
    shutil.copytree(built["base"] / "corpus-cache", cache)
    reference = load_corpus(built["cfg"].data, seed=0, cache_dir=cache)
    folder = cache / f"corpus-{_corpus_key(built['cfg'].data, 0)}"
    other = next(p for p in cache.iterdir() if p.name.startswith("corpus-") and p != folder)
    expected = reference.token_ids("train")
    _corpus_damage(case, folder, other)
    with caplog.at_level("WARNING", logger="tvae_core"):
        rebuilt = load_corpus(built["cfg"].data, seed=0, cache_dir=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and folder.name in warnings[0], warnings
    assert rebuilt.token_ids("train") == expected and rebuilt.vocab.size == reference.vocab.size


CHECKPOINT_DAMAGE = {
    "bad state.json": ("state.json", lambda f: (f / "state.json").write_text("{\n")),
    "truncated module.safetensors": ("module.safetensors", lambda f: (f / "module.safetensors").write_bytes(
        (f / "module.safetensors").read_bytes()[:200])),
    "garbage optimizer.pt": ("optimizer.pt", lambda f: (f / "optimizer.pt").write_bytes(b"not a pickle")),
    "missing manifest (killed while publishing)": ("manifest.json", lambda f: (f / "manifest.json").unlink()),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE, ids=list(CHECKPOINT_DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(built, tmp_path, caplog, case):
    file, damage = CHECKPOINT_DAMAGE[case]
    cfg, runs = built["cfg"], tmp_path / "runs"
    shutil.copytree(built["base"] / "partial", runs / f"{cfg.key}.partial")
    newest = runs / f"{cfg.key}.partial" / "step-000000008"
    damage(newest)
    with caplog.at_level("WARNING", logger="tvae_core"):
        run = train_or_load(cfg, runs, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and file in warnings[0] and "step-000000008" in warnings[0], warnings
    assert run.meta["resumed_from_step"] == 4
    assert run.metrics == built["run"].metrics and run.history == built["run"].history
    assert not (runs / f"{cfg.key}.partial").exists()  # published: checkpoints removed


def test_leftovers_of_killed_processes_are_removed_and_the_newest_checkpoint_resumed(built, tmp_path):
    cfg, runs = built["cfg"], tmp_path / "runs"
    partial = runs / f"{cfg.key}.partial"
    shutil.copytree(built["base"] / "partial", partial)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (runs / f"{cfg.key}.tmp-{dead}-0abc").mkdir()                   # a killed final write
    (partial / f"step-000000012.tmp-{dead}-0abc").mkdir()           # a killed checkpoint write
    run = train_or_load(cfg, runs, progress=False)
    assert run.meta["resumed_from_step"] == 8
    assert {p.name for p in runs.iterdir()} == {"_locks", cfg.key}
    # a run published by a process killed before it removed its checkpoints
    shutil.copytree(built["base"] / "partial", partial)
    train_or_load(cfg, runs, progress=False)
    assert not partial.exists()


def test_editing_the_corpus_changes_the_key_and_retrains(built, tmp_path):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(built["corpus"], corpus)
    cfg = tiny_config(corpus, "vae", max_steps=4)
    before = cfg.key
    with corpus.open("a") as handle:
        handle.write("\n".join(f"a brand new word{i} sentence" for i in range(20)) + "\n")
    assert cfg.key != before
    run = train_or_load(cfg, tmp_path / "runs", progress=False)
    assert run.vocab.size > built["run"].vocab.size and run.meta["corpus_sha256"]


def test_the_training_code_version_sees_code_but_not_comments(monkeypatch, built):
    from tvae_core import config as config_module
    from tvae_core.cache import source_fingerprint

    source = (ROOT / "tvae_core" / "methods.py").read_text()
    anchor = "    beta = beta_at(step, config, max_steps)\n"
    assert anchor in source

    def fingerprint(text, tmp=built["base"] / "methods.py"):
        tmp.write_text(text)
        return source_fingerprint([tmp])["methods.py"]

    original = fingerprint(source)
    commented = source.replace(anchor, "    # a comment\n" + anchor.rstrip("\n") + "  # trailing\n")
    redocumented = source.replace('"""The loss of ``config.name``', '"""The loss under ``config.name``')
    assert fingerprint(commented) == original and fingerprint(redocumented) == original
    assert fingerprint(source.replace(anchor, anchor.replace("step,", "step + 1,"))) != original
    cfg = built["cfg"]
    key = cfg.key
    monkeypatch.setattr(config_module, "training_code_version", lambda native=False: "edited")
    assert cfg.key != key  # an edited compute_loss trains a new run
    assert set(config_module.training_code_fingerprint()) == set(config_module.TRAINING_SOURCES)
    # one entry per file, named by its path in the package: model.py and pretrained/model.py, and
    # the __init__.py files of two subpackages, are separate entries
    from tvae_core import evaluation
    from tvae_core.cache import source_fingerprint as fingerprint_of

    package = Path(evaluation.__file__).parent
    assert set(fingerprint_of((package / n for n in evaluation.EVALUATION_SOURCES), root=package)) == \
        set(evaluation.EVALUATION_SOURCES)


def test_the_compiled_head_is_in_the_key_of_the_runs_that_train_with_it(monkeypatch, built):
    """An edit of the compiled LM-head kernels (C++ or their Python wrapper) moves the key of every
    run that trains its head with them and of no other run, and their meta records the files."""
    from tvae_core import config as config_module

    torch_head = tiny_config(built["corpus"], "vae", max_steps=3)
    native_head = torch_head.replace(train={"lm_head_dtype": "bfloat16", "lm_head_kernel": "native"})
    assert not torch_head.trains_native_head and native_head.trains_native_head
    fingerprint = config_module.training_code_fingerprint
    assert set(fingerprint(False)) == set(config_module.TRAINING_SOURCES)
    assert set(fingerprint(True)) == set(config_module.TRAINING_SOURCES + config_module.NATIVE_TRAINING_SOURCES)
    keys = torch_head.key, native_head.key
    for name in config_module.NATIVE_TRAINING_SOURCES:
        edited = {**fingerprint(True), name: "edited"}
        monkeypatch.setattr(config_module, "training_code_fingerprint",
                            lambda native=False, edited=edited: edited if native else fingerprint(False))
        assert torch_head.key == keys[0] and native_head.key != keys[1]
    monkeypatch.undo()
    meta = train_module._meta(native_head, train_module.TrainingModule(torch.nn.Linear(1, 1), None),
                              started=0.0, timer=train_module.StepTimer(torch.device("cpu"), 0, 3))
    assert set(meta["code_sha256"]) >= set(config_module.NATIVE_TRAINING_SOURCES)


@pytest.mark.parametrize("learning_rate", [1e3, 30.0])
def test_a_diverging_run_is_never_published(built, tmp_path, learning_rate):
    cfg = tiny_config(built["corpus"], "vae", max_steps=3).replace(train={"learning_rate": learning_rate,
                                                                          "lr_warmup_steps": 0})
    with pytest.raises(train_module.TrainingDiverged, match=r"non-finite .* at step \d+"):
        train_or_load(cfg, tmp_path, progress=False)
    assert not (tmp_path / cfg.key).exists()


def test_validation_perplexity_overflows_to_inf_and_is_refused():
    assert train_module._exp_or_inf(1e4) == float("inf")
    with pytest.raises(train_module.TrainingDiverged, match=r"perplexity_bound at step 7"):
        train_module._check_finite_metrics(7, {"rate": 1.0, "perplexity_bound": float("inf")})


def test_the_thread_count_belongs_to_the_run_and_is_restored(built, tmp_path):
    one = tiny_config(built["corpus"], "vae", max_steps=2)
    two = one.replace(train={"num_threads": 2})
    assert one.train.num_threads == 1 and one.key != two.key
    before = torch.get_num_threads()
    run = train_or_load(two, tmp_path, progress=False)
    assert run.meta["num_threads"] == 2 and torch.get_num_threads() == before


def test_two_identical_train_commands_at_once_train_once(built, tmp_path):
    cfg = tiny_config(built["corpus"], "vae", max_steps=6)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVAE_DATA_CACHE": str(tmp_path / "data-cache")}
    cmd = [sys.executable, "-m", "tvae_core", "train", "--config", str(path), "--runs-dir", str(tmp_path / "runs"),
           "--quiet"]
    processes = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("[tvae] run" in out for out, _ in outputs) == 1  # trained once, loaded once
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"_locks", cfg.key}


def test_evaluate_on_a_local_corpus_prints_a_readable_table(built, tmp_path, capsys, monkeypatch):
    from tvae_core.cli import main

    monkeypatch.setattr("tvae_core.data.DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = built["corpus"].read_text().splitlines()
    for name, part in (("train", lines[:100]), ("valid", lines[100:110]), ("test", lines[110:])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    common = ["--corpus", str(folder), "--profile", "smoke", "--max-steps", "4", "--runs-dir", str(tmp_path / "runs"),
              "--quiet"]
    assert main(["evaluate", *common]) == 0
    table = capsys.readouterr().out
    assert "test split: 10 sentences" in table
    for row in ("rate", "distortion", "IW log-likelihood (K=8)", "perplexity", "mutual information"):
        assert row in table
    assert "nats per sentence" in table and "per token" in table
    assert main(["evaluate", *common, "--json"]) == 0  # cached: loaded, not recomputed
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iw_log_likelihood"] == round(summary["iw_log_likelihood"], 3) < 0
    stored = json.loads((tmp_path / "runs" / summary["key"] / "config.json").read_text())
    assert stored["data"] == {**stored["data"], "source": "text", "path": str(folder.resolve())}
