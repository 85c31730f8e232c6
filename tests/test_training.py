"""Training and the run cache: end to end, determinism, resume after SIGKILL, damaged entries,
numerical guards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import poison_distortion, tiny_config
from tvae_core.runs import DamagedRunError, load_run, train_or_load, validate_run_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_data_cache")]
ROOT = Path(__file__).resolve().parent.parent


def _run_cli(config, runs_dir, extra_env=None, wait=True):
    path = Path(runs_dir) / f"config-{config.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVAE_DATA_CACHE": str(Path(runs_dir) / "data-cache"),
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "tvae_core", "train", "--config", str(path), "--runs-dir", str(runs_dir), "--quiet"]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("objective,target", [("vae", None), ("fb", 2.0), ("mdr", 2.0), ("cyc_fb", 2.0), ("ae", None)])
def test_train_then_load_from_cache(corpus, tmp_path, objective, target):
    cfg = tiny_config(corpus, objective, target)
    run = train_or_load(cfg, tmp_path, progress=False)
    assert run.path.name == cfg.key and (run.path / "model.safetensors").is_file()
    assert len(run.history["train"]) == cfg.train.max_steps
    assert all(torch.isfinite(torch.tensor(h["rate"])) for h in run.history["train"])
    if objective == "mdr":
        assert all("mdr_lambda" in h for h in run.history["train"]) and "mdr_lambda" in run.metrics
    mtime = (run.path / "model.safetensors").stat().st_mtime
    again = train_or_load(cfg, tmp_path, progress=False)  # loaded, not retrained
    assert (again.path / "model.safetensors").stat().st_mtime == mtime
    assert again.metrics == run.metrics


@pytest.mark.parametrize("lm_head_dtype", ["float32", "bfloat16"])
def test_same_config_and_seed_give_bit_identical_metrics_across_processes(corpus, tmp_path, lm_head_dtype):
    cfg = tiny_config(corpus, "mdr", 2.0, max_steps=6, lm_head_dtype=lm_head_dtype)
    for name in ("a", "b"):
        result = _run_cli(cfg, tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
    history_a = json.loads((tmp_path / "a" / cfg.key / "history.json").read_text())
    history_b = json.loads((tmp_path / "b" / cfg.key / "history.json").read_text())
    assert history_a == history_b
    other_seed = tiny_config(corpus, "mdr", 2.0, max_steps=6, seed=1)
    assert other_seed.key != cfg.key


@pytest.mark.parametrize("lm_head_dtype", ["float32", "bfloat16"])
def test_killed_run_resumes_and_matches_uninterrupted(corpus, tmp_path, lm_head_dtype):
    cfg = tiny_config(corpus, "mdr", 2.0, max_steps=60, checkpoint_every=10, lm_head_dtype=lm_head_dtype)
    reference = _run_cli(cfg, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = _run_cli(cfg, killed_dir, wait=False)
    partial = killed_dir / f"{cfg.key}.partial"

    def checkpoints():  # complete ones: published by renaming their staging folder
        return sorted(p for p in partial.glob("step-*") if p.name[5:].isdigit()) if partial.is_dir() else []

    deadline = time.time() + 240
    while not checkpoints() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints(), "the run finished or failed before its first checkpoint"
    assert not (killed_dir / cfg.key).exists()
    step = json.loads((checkpoints()[-1] / "state.json").read_text())["step"]
    assert 0 < step < cfg.train.max_steps

    resumed = _run_cli(cfg, killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((killed_dir / cfg.key / "meta.json").read_text())
    assert meta["resumed_from_step"] >= step
    for name in ("metrics.json", "history.json"):
        assert json.loads((killed_dir / cfg.key / name).read_text()) == \
            json.loads((tmp_path / "reference" / cfg.key / name).read_text())


def _damage_missing(path):
    (path / "history.json").unlink()


def _damage_truncated(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _damage_hash(path):
    stored = json.loads((path / "config.json").read_text())
    stored["train"]["max_steps"] += 1
    (path / "config.json").write_text(json.dumps(stored))


def _damage_version(path):
    meta = json.loads((path / "meta.json").read_text())
    meta["cache_format_version"] = -1
    (path / "meta.json").write_text(json.dumps(meta))


# the manifest's checksums catch every edit after publishing (tests/test_cache.py damages far more)
@pytest.mark.parametrize("damage,reason", [(_damage_missing, "missing"), (_damage_truncated, "checksum"),
                                           (_damage_hash, "checksum"), (_damage_version, "checksum")])
def test_damaged_cache_entry_is_detected_reported_and_retrained(corpus, tmp_path, caplog, damage, reason):
    cfg = tiny_config(corpus, "vae", max_steps=4)
    run = train_or_load(cfg, tmp_path, progress=False)
    damage(run.path)
    with pytest.raises(DamagedRunError, match=reason):
        validate_run_dir(run.path, cfg)
    with pytest.raises(DamagedRunError):
        load_run(cfg, tmp_path)
    with caplog.at_level("WARNING"):
        retrained = train_or_load(cfg, tmp_path, progress=False)
    assert "damaged" in caplog.text
    validate_run_dir(retrained.path, cfg)
    assert any(p.name.startswith(f"{cfg.key}.damaged-") for p in tmp_path.iterdir())
    assert retrained.metrics == run.metrics  # same config and seed: same numbers


def test_non_finite_loss_stops_with_a_diagnostic(corpus, tmp_path, monkeypatch):
    from tvae_core.train import TrainingDiverged

    poison_distortion(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"non-finite distortion at step 2"):
        train_or_load(tiny_config(corpus, "vae", max_steps=6), tmp_path, progress=False)
    assert not (tmp_path / tiny_config(corpus, "vae", max_steps=6).key).exists()


def test_cli_prints_where_the_run_is_stored_and_its_metrics(corpus, tmp_path):
    result = _run_cli(tiny_config(corpus, "fb", 2.0, max_steps=4), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "run stored in" in lines[-2]
    summary = json.loads(lines[-1])
    assert summary["metrics"]["rate"] >= 0 and summary["label"] == "tiny-fb"


def test_evaluation_is_cached_rebuilt_when_damaged_and_leaves_the_model_as_it_was(corpus, tmp_path):
    """evaluate_run: the sizes' bfloat16 decoder only for its own passes (the model keeps no
    precision state), the cached result returned unchanged, a damaged cache entry recomputed to
    the same numbers, and a whole profile refused in place of its estimator sizes."""
    import dataclasses

    from tvae_core.evaluation import evaluate_run
    from tvae_core.profiles import get_profile

    smoke = get_profile("smoke")
    size = dataclasses.replace(smoke.estimators, decoder_dtype="bfloat16")
    run = train_or_load(tiny_config(corpus, "fb", 2.0, max_steps=4), tmp_path, progress=False)
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    attributes = dict(vars(run.model))
    first = evaluate_run(run, size, progress=False)
    assert {k: v for k, v in vars(run.model).items() if k != "training"} == \
        {k: v for k, v in attributes.items() if k != "training"}
    assert all(torch.equal(v, state[k]) for k, v in run.model.state_dict().items())
    assert first.iw_log_likelihood <= 0 and first.mutual_information <= first.mutual_information_ceiling + 1e-9
    assert evaluate_run(run, size, progress=False) == first
    (json_path,) = run.path.glob("evaluation-*.json")
    json_path.write_text(json_path.read_text()[:20])           # truncated: damaged
    again = evaluate_run(run, size, progress=False)
    assert dataclasses.replace(again, seconds=0) == dataclasses.replace(first, seconds=0)
    with pytest.raises(TypeError, match="EstimatorSize"):
        evaluate_run(run, smoke, progress=False)


def test_a_run_exports_in_the_hugging_face_layout_next_to_its_cache_entry(corpus, tmp_path):
    from tvae_core.data import Vocabulary, collate
    from tvae_core.model import TransformerVAE
    from tvae_core.runs import export_pretrained

    run = train_or_load(tiny_config(corpus, "fb", 2.0, max_steps=4), tmp_path, progress=False)
    folder = export_pretrained(run)
    assert folder == run.path / "pretrained"
    model = TransformerVAE.from_pretrained(folder)
    vocab = Vocabulary.load(folder / "tokenizer.json")
    batch = collate([[vocab.bos_id, 5, 6, vocab.eos_id]], vocab.pad_id)
    with torch.no_grad():
        assert torch.equal(model.encode(batch).loc, run.model.encode(batch).loc)
    # the extra folder leaves the cache entry valid
    assert load_run(run.config, tmp_path).metrics == run.metrics


def _files(run):
    return {name: (run.path / name).read_bytes() for name in ("model.safetensors", "history.json", "metrics.json",
                                                              "config.json", "tokenizer.json")}


@pytest.mark.parametrize("objective,target", [("mdr", 2.0), ("fb", 2.0)])
def test_a_snapshot_of_a_longer_run_is_the_shorter_run_trained_alone(corpus, tmp_path, objective, target):
    """Training 10 steps with snapshots at 4 (a validation step of both) and 6 (validated only by
    the 6-step run) publishes runs whose weights, history, metrics and config are byte for byte
    those of the 4- and 6-step runs trained on their own; the 10-step run is unchanged by them."""
    base = tiny_config(corpus, objective, target, max_steps=10, checkpoint_every=3)
    shorter = tuple(base.replace(train={"max_steps": n}, label=f"{base.label} @ {n}") for n in (4, 6))
    with_snapshots = train_or_load(base, tmp_path / "together", progress=False, snapshots=shorter)
    for cfg in shorter:
        snapshot = load_run(cfg, tmp_path / "together")
        alone = train_or_load(cfg, tmp_path / "alone", progress=False)
        assert _files(snapshot) == _files(alone), cfg.label
        assert snapshot.meta["snapshot_of"] == base.key and [v["step"] for v in snapshot.history["valid"]][-1] \
            == cfg.train.max_steps
    assert _files(with_snapshots) == _files(train_or_load(base, tmp_path / "plain", progress=False))


def test_snapshots_that_are_not_shorter_runs_of_the_config_are_refused(corpus, tmp_path):
    from tvae_core.train import check_snapshots, is_prefix_of

    base = tiny_config(corpus, "fb", 2.0, max_steps=10)
    assert is_prefix_of(base.replace(train={"max_steps": 4}, label="x"), base)
    other_target = base.replace(objective={"target_rate": 3.0}, train={"max_steps": 4})
    longer = base.replace(train={"max_steps": 12})
    cyclical = tiny_config(corpus, "cyc_fb", 2.0, max_steps=10)   # beta's cycle length is max_steps / cycles
    for bad, parent in ((other_target, base), (longer, base), (base, base),
                        (cyclical.replace(train={"max_steps": 4}), cyclical)):
        with pytest.raises(ValueError, match="is not a shorter run"):
            check_snapshots(parent, {bad: tmp_path / "x"})
    with pytest.raises(ValueError, match="one per step"):
        check_snapshots(base, {base.replace(train={"max_steps": 4}, label="a"): tmp_path / "a",
                               base.replace(train={"max_steps": 4}, label="b"): tmp_path / "b"})
