"""One device decision, honoured everywhere: checked on the CPU.

A model on PyTorch's ``meta`` device computes shapes without data, and an op that mixes a meta
tensor with a CPU one fails ("Tensor on device meta is not on the expected device cpu"). So
running the tensor-producing half of each path (validation, the bounds, the IW bound's draws
and decoder passes, the LM head) with the model on ``meta`` and the batches built on the CPU, as
the data pipeline builds them, catches any tensor that is not moved to the model's device: the
bug that lost every GPU run at its validation. What needs real numbers (``.item()``, ``.cpu()``)
is checked by the GPU check (``make gpu-check``) and, on the CPU, by its dry run below.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvae_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tvae_core.data import iterate_batches
from tvae_core.device import module_device, move_batch, resolve_device
from tvae_core.estimators.bounds import _device_of, _encode_and_draw, _iw_from_samples
from tvae_core.lm_head import (ACCELERATOR_BLOCK_ROWS, DEFAULT_BLOCK_ROWS, _native_path_applies, default_block_rows,
                               linear_cross_entropy)
from tvae_core.model import TransformerVAE
from tvae_core.train import validation_terms

ROOT = Path(__file__).resolve().parent.parent
VOCAB, PAD, BOS, EOS, UNK = 40, 0, 1, 2, 3


def _sequences(n: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    return [[BOS] + torch.randint(4, VOCAB, (k,), generator=g).tolist() + [EOS] for k in lengths]


def _model(injection: str) -> TransformerVAE:
    config = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, latent_dim=4, injection=injection)
    torch.manual_seed(0)
    return TransformerVAE.from_scratch(config, VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
                                       max_length=16)


def _meta_model(injection: str) -> TransformerVAE:
    return _model(injection).to("meta")


@pytest.fixture
def masks_always_built(monkeypatch):
    """Data-dependent steps made shape-only: transformers skips an all-ones attention mask after
    reading its values (``mask.all()``), which a meta tensor does not have; here every mask is
    built (the same attention)."""
    import torch.fx.experimental._config as fx_config
    import transformers.masking_utils as masking

    # boolean-mask indexing (the LM head on real target positions only) needs a count; on meta
    # it assumes every element is selected, which keeps the shapes consistent
    for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
        if hasattr(masking, name):
            monkeypatch.setattr(masking, name, lambda *args, **kwargs: False)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def test_resolve_device_takes_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("TVAE_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("TVAE_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_one_fails_early_naming_the_parameter(monkeypatch):
    with pytest.raises(ValueError, match="device='cuda'.*accepted values here: 'cpu'"):
        resolve_device("cuda")
    monkeypatch.setenv("TVAE_DEVICE", "cuda")
    with pytest.raises(ValueError, match="TVAE_DEVICE|device='cuda'"):
        resolve_device()
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        resolve_device("gpu0")


def test_module_device_and_move_batch():
    model = _model("both")
    assert module_device(model) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
    batch = next(iter(iterate_batches(_sequences(), 4, PAD, shuffle=False)))
    moved = move_batch(batch, "meta")
    assert {v.device.type for v in moved.values()} == {"meta"}
    assert move_batch(batch, None).keys() == batch.keys()


@pytest.mark.parametrize("injection", ["memory", "embedding", "both", "none"])
def test_validation_follows_the_models_device(injection, masks_always_built):
    model = _meta_model(injection)
    terms = validation_terms(model, _sequences(), PAD, batch_size=5)
    assert {t.device.type for t in terms.values()} == {"meta"}
    assert terms["rate"].shape == (12,) and terms["means"].shape == (12, 4)


@pytest.mark.parametrize("injection", ["memory", "both"])
def test_the_iw_bound_draws_on_the_cpu_generator_and_decodes_on_the_models_device(injection,
                                                                                  masks_always_built):
    model = _meta_model(injection).eval()
    assert _device_of(model, None) == torch.device("meta")
    assert _device_of(model, "cpu") == "cpu"
    batch = move_batch(next(iter(iterate_batches(_sequences(), 4, PAD, shuffle=False))), _device_of(model, None))
    with torch.no_grad():
        posterior, chunks = _encode_and_draw_unchecked(model, batch, (6,), 4, torch.Generator().manual_seed(0))
        assert all(z.device.type == "meta" and eps.device.type == "meta" for z, eps in chunks)
        bound = _iw_from_samples(model, batch, posterior, chunks, (6,))
    assert bound.device.type == "meta" and bound.shape == (1, 4)


def _encode_and_draw_unchecked(model, batch, ladder, chunk_size, generator):
    """``_encode_and_draw`` without its finiteness check (a meta tensor has no values to check)."""
    from unittest import mock

    with mock.patch("tvae_core.estimators.bounds.check_finite"):
        return _encode_and_draw(model, batch, ladder, chunk_size, generator)


def test_lm_head_blocks_are_sized_by_the_device():
    assert default_block_rows(torch.device("cpu")) == DEFAULT_BLOCK_ROWS
    assert default_block_rows(torch.device("meta")) == ACCELERATOR_BLOCK_ROWS
    hidden, weight = torch.randn(10, 8, device="meta"), torch.randn(30, 8, device="meta")
    targets = torch.zeros(10, dtype=torch.long, device="meta")
    assert linear_cross_entropy(hidden, weight, None, targets).shape == (10,)
    # the compiled CPU kernel is never chosen for tensors on another device
    assert not _native_path_applies(hidden, weight, None, torch.bfloat16)


def test_generation_moves_a_cpu_latent_to_the_model_and_samples_with_a_cpu_generator():
    model = _model("both").eval()
    z = torch.randn(3, 4)
    first = model.generate(z, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    again = model.generate(z, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert first == again and len(first) == 3


def test_load_run_puts_the_model_on_the_device_asked_for(tmp_path):
    from tvae_core.runs import load_run, train_or_load

    config = RunConfig(data=DataConfig(vocab_size=50, max_length=64, max_train_sentences=64, max_eval_sentences=16,
                                       max_test_sentences=16),
                       model=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, latent_dim=4),
                       train=TrainConfig(max_steps=2, batch_size=8, eval_every=2, checkpoint_every=2,
                                         lr_warmup_steps=1))
    run = train_or_load(config, tmp_path, progress=False, device="cpu")
    assert module_device(run.model) == torch.device("cpu")
    timing = run.meta["timing"]
    assert timing["device"] == "cpu" and timing["timed_steps"] == 1 and timing["tokens_per_second"] > 0
    assert module_device(load_run(config, tmp_path, device="cpu").model) == torch.device("cpu")


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """`make gpu-check`'s script, dry-run on the CPU with the smoke profile, so it cannot rot
    between the sessions that have a GPU."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                             "--steps", "6", "--side-steps", "4", "--warmup-steps", "2", "--eval-sentences", "8",
                             "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 6 and all(r["ms_per_step"] > 0 for r in report["runs"])
    assert report["whole_split_iw"]["num_sentences"] > 0 and report["grid"]["runs"] > 0


def test_the_gpu_checks_grid_projection_trains_each_group_once():
    """`make gpu-check` projects the book's grid as train-all trains it: a shorter run of the same
    config is published on the way by the longer one, so its steps are not counted twice."""
    import importlib.util

    from tvae_core.experiments import method_config

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    vae = method_config("VAE", "smoke").replace(train={"max_steps": 100})
    runs = {"VAE @ 40": vae.replace(train={"max_steps": 40}, label="VAE @ 40"), "VAE": vae,
            "LM": method_config("LM", "smoke").replace(train={"max_steps": 100}),
            "CYC": method_config("CYC", "smoke").replace(train={"max_steps": 100})}
    grid = gpu_check.grid_projection(runs, vae_ms=60.0, lm_ms=30.0)
    assert grid["runs"] == 4 and grid["processes"] == 3 and grid["steps_trained"] == 300
    assert grid["train_hours"] == pytest.approx((200 * 60.0 + 100 * 30.0) / 1000 / 3600)
