"""The training loop's speed options give the numbers of the plain loop: the same losses, history
records and weights (``train.sync_every``), and the same diagnostics when training diverges."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import poison_distortion, tiny_config
from tvae_core.runs import train_into_cache
from tvae_core.train import TrainingDiverged

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_data_cache")]


def _config(corpus, sync_every: int, **objective):
    cfg = tiny_config(corpus, objective.pop("name", "mdr"), objective.pop("target_rate", 2.0), max_steps=13,
                      **objective)
    # validation and checkpoints off the sync points, so reads happen at both kinds of boundary
    return cfg.replace(train={"eval_every": 6, "checkpoint_every": 9, "sync_every": sync_every})


@pytest.mark.parametrize("objective", [{"mdr_rate_ema": 0.9}, {"name": "fb"}])
def test_deferred_diagnostics_give_the_same_history_and_weights(corpus, tmp_path, objective):
    every_step, deferred = _config(corpus, 1, **dict(objective)), _config(corpus, 4, **dict(objective))
    assert every_step.key == deferred.key  # a speed option, not part of what the run is
    runs = {n: train_into_cache(cfg, tmp_path / n, progress=False) for n, cfg in (("a", every_step), ("b", deferred))}
    history = {n: json.loads((run / "history.json").read_text()) for n, run in runs.items()}
    assert len(history["b"]["train"]) == 13
    assert history["a"] == history["b"]  # every record, every value, bit for bit
    assert [list(r) for r in history["a"]["train"]] == [list(r) for r in history["b"]["train"]]  # key order
    weights = {n: load_file(str(run / "model.safetensors")) for n, run in runs.items()}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])


def test_deferred_diagnostics_name_the_first_non_finite_step(corpus, tmp_path, monkeypatch):
    poison_distortion(monkeypatch)
    cfg = _config(corpus, 5, name="vae", target_rate=None)
    with pytest.raises(TrainingDiverged, match=r"non-finite distortion at step 2 \(value sample: \[nan"):
        train_into_cache(cfg, tmp_path, progress=False)
    assert not (tmp_path / cfg.key).exists()


@pytest.mark.skipif(not __import__("tvae_core.native", fromlist=["available"]).available(),
                    reason="the native kernel cannot be built here")
def test_native_lm_head_and_deferred_reads_train_to_the_same_losses(corpus, tmp_path):
    """The fast path (train.lm_head_kernel="native", train.sync_every) against the plain loop with
    the torch head: the same losses to float rounding at every step (not bit for bit: the kernels
    round differently), so a run of its own in the cache."""
    plain = tiny_config(corpus, "fb", 2.0, max_steps=13, lm_head_dtype="bfloat16")
    fast = plain.replace(train={"lm_head_kernel": "native", "sync_every": 5})
    assert fast.key != plain.key
    histories = [json.loads((train_into_cache(cfg, tmp_path / str(i), progress=False) / "history.json").read_text())
                 for i, cfg in enumerate((plain, fast))]
    for name in ("loss", "rate", "distortion"):
        old = torch.tensor([r[name] for r in histories[0]["train"]])
        new = torch.tensor([r[name] for r in histories[1]["train"]])
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4)
    assert [list(r) for r in histories[0]["train"]] == [list(r) for r in histories[1]["train"]]
