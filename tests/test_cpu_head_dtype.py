"""The CPU profiles' LM-head dtype follows the hardware: bfloat16 where the CPU multiplies it in
hardware, float32 elsewhere (in software bfloat16 is ~10x slower), overridable, and it reaches every
run of the profile and its estimators."""
import os
import subprocess
import sys

import pytest

from tvae_core import device
from tvae_core.device import HEAD_DTYPE_ENV, cpu_head_dtype


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_the_head_dtype_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.delenv(HEAD_DTYPE_ENV, raising=False)
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: native)
    assert cpu_head_dtype() == expected


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("override", ["float32", "bfloat16"])
def test_the_environment_overrides_the_cpu(monkeypatch, native, override):
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: native)
    monkeypatch.setenv(HEAD_DTYPE_ENV, override)
    assert cpu_head_dtype() == override


def test_a_bad_override_fails_naming_the_variable_and_the_accepted_values(monkeypatch):
    monkeypatch.setenv(HEAD_DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match=r"TVAE_CPU_HEAD_DTYPE='float16'.*\('float32', 'bfloat16'\)"):
        cpu_head_dtype()


def test_the_probe_reads_torchs_cpu_dispatch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert device.cpu_has_native_bfloat16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert device.cpu_has_native_bfloat16() is True


@pytest.mark.parametrize("override, kernel", [("float32", "torch"), ("bfloat16", "native")])
def test_the_cpu_profiles_train_and_evaluate_with_that_dtype(override, kernel):
    # profiles are built at import: a fresh process with the variable set
    code = ("from tvae_core.profiles import get_profile; d, s = get_profile('default'), get_profile('smoke'); "
            "print(d.train.lm_head_dtype, d.train.lm_head_kernel, d.estimators.decoder_dtype, s.train.lm_head_dtype, "
            "get_profile('full').estimators.decoder_dtype)")
    env = {**os.environ, HEAD_DTYPE_ENV: override}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [override, kernel, override, override, "bfloat16"]   # full: a GPU's bfloat16


def test_profiles_for_either_head_and_a_bad_one_refused():
    from tvae_core.profiles import build_profiles

    for head, kernel in (("float32", "torch"), ("bfloat16", "native")):
        built = build_profiles(head)
        assert (built["default"].train.lm_head_dtype, built["default"].train.lm_head_kernel) == (head, kernel)
        assert built["smoke"].train.lm_head_dtype == built["default"].estimators.decoder_dtype == head
    with pytest.raises(ValueError, match=r"cpu_head='float16'.*\('float32', 'bfloat16'\)"):
        build_profiles("float16")
