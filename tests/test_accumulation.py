"""Gradient accumulation is one optimiser step over the whole batch, and the MDR multiplier's
gradient goes through fp16's loss scale exactly once."""
import pytest
import torch

from helpers import tiny_config
from tvae_core.objectives import LagrangeMultiplier, mdr_loss
from tvae_core.runs import train_or_load
from tvae_core.train import _unscale_state_gradient

pytestmark = pytest.mark.usefixtures("isolated_data_cache")


@pytest.mark.slow
@pytest.mark.parametrize("objective,target", [("vae", None), ("mdr", 2.0)])
def test_micro_batches_take_the_step_of_their_whole_batch(corpus, tmp_path, objective, target):
    # no randomness in the forward pass (dropout off, z = posterior mean): the runs differ only
    # in how each step's batch of 8 is split (free bits would not be equal: it clamps each
    # micro-batch's rate, and that is documented on TrainConfig)
    whole = tiny_config(corpus, objective, target, max_steps=5).replace(
        model={"dropout": 0.0, "deterministic_encoder": True})
    split = whole.replace(train={"gradient_accumulation_steps": 2})
    one = train_or_load(whole, tmp_path / "whole", progress=False)
    two = train_or_load(split, tmp_path / "split", progress=False)
    assert len(two.history["train"]) == whole.train.max_steps  # the step counter counts optimiser steps
    for a, b in zip(one.history["train"], two.history["train"]):
        assert b["step"] == a["step"] and b["lr"] == a["lr"]
        for name in ("loss", "rate", "distortion", "grad_norm") + (("mdr_lambda",) if objective == "mdr" else ()):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (a["step"], name)
    weights_one, weights_two = one.model.state_dict(), two.model.state_dict()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_batch_that_micro_batches_cannot_split_equally_is_refused(corpus, tmp_path):
    config = tiny_config(corpus, max_steps=2).replace(train={"gradient_accumulation_steps": 3})
    with pytest.raises(ValueError, match=r"train.batch_size=8 .*gradient_accumulation_steps \(3\)"):
        train_or_load(config, tmp_path, progress=False)


def _multiplier_gradient(scaler=None, loss_scale=1.0):
    multiplier = LagrangeMultiplier(0.5)
    kl_per_dim = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    loss, _ = mdr_loss(torch.tensor([5.0, 6.0]), kl_per_dim, 2.0, multiplier)
    (loss * loss_scale).backward()
    _unscale_state_gradient(multiplier, scaler)
    return multiplier.u.grad


def test_the_multipliers_gradient_is_unscaled_once_by_the_loss_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    plain = _multiplier_gradient()
    assert plain is not None and plain.abs().item() > 0
    torch.testing.assert_close(_multiplier_gradient(scaler, scaler.get_scale()), plain)
    overflowed = torch.amp.GradScaler("cpu", init_scale=2.0 ** 200)   # the scaled gradient is inf in float32
    assert _multiplier_gradient(overflowed, float("inf")) is None    # dropped: its optimiser skips the step
    assert torch.equal(_multiplier_gradient(None), plain)            # no scaler (no fp16): untouched


def test_the_cli_sets_accumulation_and_mixed_precision(monkeypatch):
    from tvae_core import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.setdefault("cfg", cli._config_from_args(args)) and 0)
    assert cli.main(["train", "--profile", "smoke", "--gradient-accumulation-steps", "4",
                     "--mixed-precision", "bf16"]) == 0
    assert seen["cfg"].train.gradient_accumulation_steps == 4 and seen["cfg"].train.mixed_precision == "bf16"
