"""The compiled LM-head kernel (tvae_core.native) against float64 on the same bfloat16 logits, and
the torch path it replaces in gradient-free evaluation."""
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

from tvae_core import native
from tvae_core.lm_head import _exact_target_logits, linear_cross_entropy

needs_kernel = pytest.mark.skipif(not native.available(), reason="the native kernel cannot be built here")


def _case(rows, vocab=1000, hidden=32, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * scale
    t = torch.randint(0, vocab, (rows,), generator=gen)
    return h, w, t


def _reference(h, w, t):
    """float64 NLL on the kernel's own inputs: bfloat16 logits, the target's logit exact."""
    logits = F.linear(h.bfloat16(), w.bfloat16()).double()
    exact = _exact_target_logits(h, w, None, t).double()
    logits[torch.arange(len(t)), t] = exact
    return torch.logsumexp(logits, -1) - exact


def _kernel(h, w, t):
    return native.lm_head_nll(h.bfloat16(), w.bfloat16(), t, _exact_target_logits(h, w, None, t))


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 15, 16, 64, 65, 200])
def test_kernel_matches_float64_on_the_same_logits(rows):
    """Every block size (partial vectors, partial blocks): within float32 rounding of the exact
    log-sum-exp, with no bias (the mean error is far below the largest)."""
    h, w, t = _case(rows)
    nll = _kernel(h, w, t)
    assert nll.shape == (rows,) and nll.dtype == torch.float32
    if rows:
        error = nll.double() - _reference(h, w, t)
        assert error.abs().max() < 3e-6, error.abs().max()


@needs_kernel
def test_kernel_is_unbiased_and_as_close_as_the_torch_path():
    h, w, t = _case(4096, vocab=10_001, hidden=64)
    reference = _reference(h, w, t)
    with torch.no_grad(), native.disabled():
        torch_path = linear_cross_entropy(h, w, None, t, compute_dtype=torch.bfloat16).double()
    kernel = _kernel(h, w, t).double()
    assert (kernel - reference).abs().max() < 3e-6
    assert abs(float((kernel - reference).mean())) < 3e-7  # a bias would add up over a sentence
    assert (kernel - torch_path).abs().max() < 5e-6


@needs_kernel
def test_kernel_handles_a_wide_spread_of_logits_and_edge_targets():
    """Logits 200 nats apart (the exponential's underflow clamp) and the first/last word as targets."""
    h, w, t = _case(70, vocab=500, scale=8.0, seed=1)
    t[:35], t[35:] = 0, 499
    torch.testing.assert_close(_kernel(h, w, t).double(), _reference(h, w, t), rtol=1e-6, atol=2e-6)


@needs_kernel
def test_kernel_near_certain_target_is_never_negative():
    """The target ~40 nats above every other word: -log p ~ 0, not below (the rounded target's
    term is swapped for the exact one inside a sum of ~1)."""
    h, w, t = _case(64, vocab=300, scale=0.1, seed=2)
    t[:] = 7
    h[:, -1] = 1.0   # the last hidden unit is a constant: its weights act as a bias
    w[:, -1] = 0.0
    w[7, -1] = 40.3
    nll = _kernel(h, w, t)
    assert (nll >= 0).all()
    torch.testing.assert_close(nll.double(), _reference(h, w, t).clamp_min(0), rtol=0, atol=1e-6)


@needs_kernel
def test_kernel_is_deterministic_across_thread_counts_and_concurrent_callers():
    """Blocks run in parallel; each block's arithmetic is fixed, so the result is bit-identical on
    1 or 2 threads and when two Python threads call at once (the call releases the GIL)."""
    h, w, t = _case(300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(h, w, t)
        torch.set_num_threads(2)
        two = _kernel(h, w, t)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    results = [None, None]

    def call(i):
        results[i] = _kernel(h, w, t)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results[0], one) and torch.equal(results[1], one)


@needs_kernel
def test_linear_cross_entropy_uses_the_kernel_only_without_gradients_and_bias():
    h, w, t = _case(100)
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, w, None, t, compute_dtype=torch.bfloat16)
        with native.disabled():
            torch_path = linear_cross_entropy(h, w, None, t, compute_dtype=torch.bfloat16)
    assert torch.equal(evaluated, _kernel(h, w, t))
    assert not torch.equal(evaluated, torch_path)  # the other path: equal only to rounding
    torch.testing.assert_close(evaluated, torch_path, rtol=0, atol=5e-6)
    # with gradients (training) the autograd function runs, and gradients flow
    hidden = h.clone().requires_grad_()
    trained = linear_cross_entropy(hidden, w, None, t, compute_dtype=torch.bfloat16)
    trained.sum().backward()
    assert torch.equal(trained.detach(), torch_path) and hidden.grad is not None
    # float32 and biased heads keep the torch path
    with torch.no_grad(), native.disabled():
        float32 = linear_cross_entropy(h, w, None, t)
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(h, w, None, t), float32)


@needs_kernel
def test_kernel_rejects_bad_inputs_naming_them():
    h, w, t = _case(10)
    exact = _exact_target_logits(h, w, None, t)
    with pytest.raises(RuntimeError, match="bfloat16"):
        native.lm_head_nll(h, w.bfloat16(), t, exact)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 1000\)"):
        native.lm_head_nll(h.bfloat16(), w.bfloat16(), t + 1000, exact)
    with pytest.raises(RuntimeError, match="target_logits"):
        native.lm_head_nll(h.bfloat16(), w.bfloat16(), t, exact.double())


def test_a_failed_build_falls_back_to_torch_with_a_warning(monkeypatch):
    """No compiler (or TVAE_CORE_NATIVE=0): a warning that says why, and the torch path."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")
    native._load_module.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "FASTER_ON", (torch.backends.cpu.get_cpu_capability(),))  # any CPU
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*torch path"):
            assert not native.available()
        assert native.describe() == "torch path (the kernel could not be built)"
        h, w, t = _case(20)
        with torch.no_grad():
            nll = linear_cross_entropy(h, w, None, t, compute_dtype=torch.bfloat16)
        torch.testing.assert_close(nll.double(), _reference(h, w, t), rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="not available"):
            native.lm_head_nll(h.bfloat16(), w.bfloat16(), t, _exact_target_logits(h, w, None, t))
        native._load_module.cache_clear()
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.available()  # switched off on purpose: no warning
            assert native.describe() == f"torch path ({native.DISABLE_VARIABLE}=0)"
    finally:
        native._load_module.cache_clear()


@needs_kernel
def test_describe_names_the_path_evaluation_takes():
    assert native.describe().startswith("compiled kernel (tvae_core.native, ")
    with native.disabled():
        assert native.describe() == "torch path (tvae_core.native.disabled)"


def test_a_dead_builds_lock_is_removed_and_a_live_one_kept(tmp_path):
    """torch waits for ever on a lock left by a killed build; a fresh lock is a build in progress."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    native._remove_stale_lock(lock)
    assert lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    native._remove_stale_lock(lock)
    assert not lock.exists()
    native._remove_stale_lock(lock)  # no lock: nothing to do


@needs_kernel
@pytest.mark.parametrize("rows", [1, 64, 150])
def test_native_training_head_matches_the_torch_path_in_values_and_gradients(rows):
    """TrainConfig.lm_head_kernel="native": the same NLL as the torch path's bfloat16 training head
    to float rounding, and gradients as close to float64's (on the same bfloat16 operands) as the
    torch path's, with a weighted sum (any incoming gradient), every block size, and the padded
    rows of the last block contributing nothing. Where the CPU multiplies bfloat16 in hardware
    both paths take its matmul and their gradients agree to float rounding; elsewhere torch's
    software bfloat16 matmul rounds its own way, and the two differ at bfloat16's precision."""
    from tvae_core.device import cpu_has_native_bfloat16

    h, w, t = _case(rows)
    g = torch.rand(rows, generator=torch.Generator().manual_seed(1))
    results = []
    for native_training in (False, True):
        hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
        nll = linear_cross_entropy(hidden, weight, None, t, compute_dtype=torch.bfloat16,
                                   native_training=native_training)
        (nll * g).sum().backward()
        results.append((nll.detach(), hidden.grad, weight.grad))
    (nll_torch, gh_torch, gw_torch), (nll_native, gh_native, gw_native) = results
    torch.testing.assert_close(nll_native, nll_torch, rtol=0, atol=5e-6)
    hidden, weight = h.bfloat16().double().requires_grad_(), w.bfloat16().double().requires_grad_()
    (F.cross_entropy(hidden @ weight.T, t, reduction="none") * g.double()).sum().backward()

    def relative(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for native_grad, torch_grad, exact in ((gh_native, gh_torch, hidden.grad), (gw_native, gw_torch, weight.grad)):
        assert native_grad.dtype == torch.float32
        assert relative(native_grad, exact) < 1e-2                                  # bfloat16's precision
        assert relative(native_grad, exact) <= 1.1 * relative(torch_grad, exact) + 1e-6
        if cpu_has_native_bfloat16():
            assert relative(native_grad, torch_grad) < 2e-5


@needs_kernel
@pytest.mark.parametrize("rows", [1, 64, 150])
def test_kept_logits_give_the_recomputed_gradients_bit_for_bit(rows):
    """The training head keeps each block's logits from the forward pass instead of recomputing
    them: the same numbers exactly (the same matmul on the same operands); the kept blocks are
    consumed, so a second backward through the graph recomputes and still agrees."""
    h, w, t = _case(rows)
    hb, wb, exact = h.bfloat16(), w.bfloat16(), _exact_target_logits(h, w, None, t)
    g = torch.rand(rows, generator=torch.Generator().manual_seed(2))
    nll, logits = native.lm_head_nll_keeping_logits(hb, wb, t, exact)
    assert torch.equal(nll, native.lm_head_nll(hb, wb, t, exact))
    assert len(logits) == -(-rows // logits[0].shape[1]) and logits[0].shape[0] == w.shape[0]
    recomputed = native.lm_head_nll_backward(hb, wb, t, exact, nll + exact, g)
    kept = native.lm_head_nll_backward(hb, wb, t, exact, nll + exact, g, logits)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="logits must be empty or"):
        native.lm_head_nll_backward(hb, wb, t, exact, nll + exact, g, logits + logits)

    hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = (linear_cross_entropy(hidden, weight, None, t, compute_dtype=torch.bfloat16,
                                 native_training=True) * g).sum()
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    loss.backward()
    assert torch.equal(hidden.grad, first[0]) and torch.equal(weight.grad, first[1])
    assert torch.equal(first[0], recomputed[0]) and torch.equal(first[1], recomputed[1])


@needs_kernel
def test_native_training_head_applies_only_where_it_can():
    """A biased head, a float32 head and gradient-free calls keep their paths."""
    h, w, t = _case(30)
    bias = torch.zeros(w.shape[0], requires_grad=True)
    hidden = h.clone().requires_grad_()
    assert type(linear_cross_entropy(hidden, w, bias, t, compute_dtype=torch.bfloat16,
                                     native_training=True).grad_fn).__name__ == "_LinearCrossEntropyBackward"
    assert type(linear_cross_entropy(hidden, w, None, t, native_training=True).grad_fn).__name__ \
        == "_LinearCrossEntropyBackward"
    assert type(linear_cross_entropy(hidden, w, None, t, compute_dtype=torch.bfloat16,
                                     native_training=True).grad_fn).__name__ == "_NativeLinearCrossEntropyBackward"
    with native.disabled():
        assert type(linear_cross_entropy(hidden, w, None, t, compute_dtype=torch.bfloat16,
                                         native_training=True).grad_fn).__name__ == "_LinearCrossEntropyBackward"
