"""`make gpu-profile`'s script (benchmarks/gpu_step_profile.py): its batches and a CPU dry run.

The script compares step-time levers on a GPU; these checks keep what it compares honest (padding
a batch changes no term, every padded length is warmed up before the timed steps) and keep the
script from rotting between the sessions that have a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tvae_core.config import ModelConfig
from tvae_core.data import collate
from tvae_core.model import TransformerVAE

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_step_profile.py"
VOCAB, PAD, BOS, EOS, UNK = 40, 0, 1, 2, 3


def _script():
    spec = importlib.util.spec_from_file_location("gpu_step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return collate([[BOS] + torch.randint(4, VOCAB, (k,), generator=g).tolist() + [EOS] for k in lengths], PAD)


def test_padding_to_a_multiple_pads_with_masked_pad_tokens():
    gp = _script()
    batch = _batch([3, 7, 5])  # length 9
    padded = gp.pad_to_multiple(batch, 8, PAD)
    assert padded["input_ids"].shape == padded["attention_mask"].shape == (3, 16)
    assert torch.equal(padded["input_ids"][:, :9], batch["input_ids"])
    assert (padded["input_ids"][:, 9:] == PAD).all() and (padded["attention_mask"][:, 9:] == 0).all()
    assert gp.pad_to_multiple(batch, 9, PAD) is batch and gp.pad_to_multiple(batch, 1, PAD) is batch


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_padding_changes_no_training_term(injection):
    """The levers are compared on padded batches: the rate and distortion of a padded batch are
    those of the batch itself (dropout off, the same latent draw), to float rounding."""
    gp = _script()
    torch.manual_seed(0)
    model = TransformerVAE.from_scratch(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, latent_dim=4,
                                                    injection=injection),
                                        VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, max_length=32).eval()
    batch = _batch([3, 7, 5, 11])
    terms = {}
    for name, b in (("plain", batch), ("padded", gp.pad_to_multiple(batch, 16, PAD))):
        torch.manual_seed(1)
        with torch.no_grad():
            terms[name] = model.forward_terms(b)
    assert gp.pad_to_multiple(batch, 16, PAD)["input_ids"].shape[1] == 16 > batch["input_ids"].shape[1]
    for key in ("distortion", "kl_per_dim"):
        torch.testing.assert_close(terms["padded"][key], terms["plain"][key], rtol=1e-5, atol=1e-5)


def test_every_padded_length_is_warmed_up_before_the_timed_steps():
    gp = _script()
    timed = [_batch([5]), _batch([13]), _batch([6])]  # lengths 7, 15, 8
    pool = [_batch([4]), _batch([12])]  # lengths 6 and 14: no spare batch of the timed lengths
    pool += [_batch([5], seed=9)]  # one spare of length 7
    warmup = gp.warmup_batches(pool, timed, per_shape=3)
    lengths = [b["input_ids"].shape[1] for b in warmup]
    assert lengths == [7, 7, 7, 8, 8, 8, 15, 15, 15]
    assert warmup[0] is pool[2]  # a spare batch first, the timed batch only when none is spare


def test_host_synchronisations_are_counted_by_the_line_that_asked_for_them(monkeypatch):
    """CUDA's sync debug mode warns once per synchronisation ("called a synchronizing CUDA
    operation", from the Python line that caused it); the script counts those warnings only, and
    always switches the mode back."""
    gp = _script()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step(batch, index, max_steps):
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)

    count, sites = gp.host_syncs(step, {}, 0, 1)
    assert count == 2 and len(sites) == 1 and list(sites.values()) == [2]
    assert next(iter(sites)).startswith("test_gpu_step_profile.py:") and modes == ["warn", "default"]


def test_compiling_a_model_without_transformer_blocks_is_refused():
    with pytest.raises(RuntimeError, match="no transformer block"):
        _script().compile_blocks(torch.nn.Linear(2, 2), None)


@pytest.mark.slow
def test_gpu_step_profile_script_runs_on_the_cpu(tmp_path):
    """The eager variants end to end on the CPU with the smoke profile (the compiled ones take a
    minute to compile on this machine's two cores and were run by hand)."""
    out = tmp_path / "gpu_step_profile.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--variants", "fp32", "bf16",
                             "--methods", "MDR", "LM", "--steps", "3", "--profile-steps", "1", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and set(report["methods"]) == {"MDR 4", "LM"}
    for method in report["methods"].values():
        rows = {row["variant"]: row for row in method["variants"]}
        assert set(rows) == {"fp32", "bf16"}
        assert all(row["ms_per_step"] > 0 and row["timed_steps"] == 3 for row in rows.values())
        # the same weights, seed and batches: bfloat16 moves the loss by rounding only
        assert rows["bf16"]["mean_loss"] == pytest.approx(rows["fp32"]["mean_loss"], rel=0.01)
        assert all(length % 16 == 0 for length in method["padded_lengths"])


@pytest.mark.slow
def test_the_gpu_session_script_runs_its_dry_run_and_refuses_unknown_arguments(tmp_path):
    """The shell glue of one lent-GPU call (benchmarks/gpu_session.sh): its import check and the
    profile's dry run, logs and JSON in $OUT; a wrong argument stops it before any work; a part
    that runs out of its time says so."""
    script = ROOT / "benchmarks" / "gpu_session.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path),
           "GPU_WHEELS": str(tmp_path / "no-wheels")}  # this machine's packages, not a lent machine's wheels
    refused = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "accepted: --check, --no-profile, --dry-run" in refused.stderr
    result = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "gpu-profile done" in (tmp_path / "gpu_step_profile.log").read_text()
    assert json.loads((tmp_path / "gpu_step_profile.json").read_text())["failed"] == []
    # a part cut at its own limit exits 4, which the device tool does not mistake for its timeout
    cut = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "PROFILE_SECONDS": "1"}, timeout=600)
    assert cut.returncode == 4 and "stopped at its time limit" in cut.stderr
