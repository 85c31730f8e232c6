"""The fused, blocked LM head + cross-entropy equals the plain computation, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from tvae_core import native
from tvae_core.lm_head import linear_cross_entropy


def _plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_values_and_gradients_match_plain_cross_entropy(with_bias, block_rows):
    gen = torch.Generator().manual_seed(0)
    m, h, v = 37, 16, 101
    hidden0 = torch.randn(m, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen) * 0.5
    bias0 = torch.randn(v, generator=gen) if with_bias else None
    targets = torch.randint(0, v, (m,), generator=gen)
    upstream = torch.rand(m, generator=gen)  # a non-uniform upstream gradient

    results = []
    for fn in (_plain, lambda *a: linear_cross_entropy(*a, block_rows=block_rows)):
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        bias = bias0.clone().requires_grad_() if with_bias else None
        nll = fn(hidden, weight, bias, targets)
        (nll * upstream).sum().backward()
        results.append((nll.detach(), hidden.grad, weight.grad, bias.grad if with_bias else None))
    (ref, ref_h, ref_w, ref_b), (out, out_h, out_w, out_b) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(out_b, ref_b, rtol=1e-5, atol=1e-5)


def test_tied_weights_accumulate_both_gradients():
    """GPT-2 ties the head to the input embedding: the weight's gradient must be the sum of both uses."""
    gen = torch.Generator().manual_seed(1)
    weight0 = torch.randn(50, 8, generator=gen)
    ids = torch.randint(0, 50, (12,), generator=gen)
    targets = torch.randint(0, 50, (12,), generator=gen)
    grads = []
    for fn in (_plain, linear_cross_entropy):
        weight = weight0.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, weight))
        fn(hidden, weight, None, targets).sum().backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_the_backward_pass_reads_the_forward_pass_logits_and_can_run_twice(compute_dtype):
    """With gradients, the forward pass keeps each block's float32 logits (the backward pass turns
    them into the gradient); a second backward pass through the same graph reads them again."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=gen).requires_grad_()
    weight = torch.randn(101, 16, generator=gen).requires_grad_()
    targets = torch.randint(0, 101, (37,), generator=gen)
    nll = linear_cross_entropy(hidden, weight, None, targets, block_rows=10, compute_dtype=compute_dtype)
    kept = nll.grad_fn.kept_logits   # the custom Function's context
    assert [tuple(block.shape) for block in kept] == [(10, 101)] * 3 + [(7, 101)]
    assert all(block.dtype == torch.float32 for block in kept)
    with torch.no_grad():   # the kept logits are this block's logits, exact target logit included
        reference = linear_cross_entropy(hidden, weight, None, targets, block_rows=10,
                                         compute_dtype=compute_dtype)
    torch.testing.assert_close(torch.logsumexp(torch.cat(kept), 1) - torch.cat(kept)[torch.arange(37), targets],
                               reference, rtol=1e-6, atol=1e-5)
    nll.sum().backward(retain_graph=True)
    first = (hidden.grad.clone(), weight.grad.clone())
    nll.sum().backward()
    assert torch.equal(hidden.grad, 2 * first[0]) and torch.equal(weight.grad, 2 * first[1])


def test_no_grad_path_and_bad_shapes():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([0, 1, 2, 3, 8])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, targets, block_rows=2),
                                   _plain(hidden, weight, None, targets))
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, None, targets[:3])
    with pytest.raises(ValueError, match="block_rows"):
        linear_cross_entropy(hidden, weight, None, targets, block_rows=0)
    with pytest.raises(ValueError, match="compute_dtype=torch.int8 .*accepted values"):
        linear_cross_entropy(hidden, weight, None, targets, compute_dtype=torch.int8)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_evaluation_is_close(with_bias):
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen) * 0.3
    bias = torch.randn(300, generator=gen) if with_bias else None
    targets = torch.randint(0, 300, (40,), generator=gen)
    with torch.no_grad():
        exact = linear_cross_entropy(hidden, weight, bias, targets)
        fast = linear_cross_entropy(hidden, weight, bias, targets, compute_dtype=torch.bfloat16)
        rounded_target = F.cross_entropy(F.linear(hidden.bfloat16(), weight.bfloat16(),
                                                  bias.bfloat16() if with_bias else None).float(),
                                         targets, reduction="none")
    assert fast.dtype == torch.float32
    assert 0 < (fast - exact).abs().max() < 0.02      # rounded, but only just
    # the exact target logit: closer than rounding every logit (the previous computation)
    assert (fast - exact).abs().mean() < (rounded_target - exact).abs().mean()


@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_training_matches_its_evaluation_values_and_float32_gradients(with_bias):
    """Mixed precision in training: the same values as the gradient-free bfloat16 computation, and
    gradients within bfloat16 rounding of the float32 ones (tied weights: both uses summed)."""
    gen = torch.Generator().manual_seed(4)
    m, h, v = 150, 16, 300  # three blocks of 64 rows, the last one partial
    weight0 = torch.randn(v, h, generator=gen) * 0.3
    bias0 = torch.randn(v, generator=gen) if with_bias else None
    ids = torch.randint(0, v, (m,), generator=gen)
    targets = torch.randint(0, v, (m,), generator=gen)
    upstream = torch.rand(m, generator=gen)
    results = {}
    for dtype in (None, torch.bfloat16):
        weight = weight0.clone().requires_grad_()
        bias = bias0.clone().requires_grad_() if with_bias else None
        hidden = torch.tanh(F.embedding(ids, weight) * 3)
        nll = linear_cross_entropy(hidden, weight, bias, targets, compute_dtype=dtype)
        (nll * upstream).sum().backward()
        results[dtype] = (nll.detach(), weight.grad, bias.grad if with_bias else None)
        with torch.no_grad():
            evaluation = linear_cross_entropy(hidden, weight, bias, targets, compute_dtype=dtype)
            with native.disabled():  # the same torch path: the same values to the bit
                torch_evaluation = linear_cross_entropy(hidden, weight, bias, targets, compute_dtype=dtype)
        torch.testing.assert_close(nll.detach(), torch_evaluation, rtol=0, atol=0)
        # the compiled evaluation kernel (bfloat16, no bias): the same to float32 rounding
        torch.testing.assert_close(nll.detach(), evaluation, rtol=0, atol=2e-6)
    (nll32, grad_w32, grad_b32), (nll16, grad_w16, grad_b16) = results[None], results[torch.bfloat16]
    assert nll16.dtype == torch.float32 and grad_w16.dtype == torch.float32
    assert 0 < (nll16 - nll32).abs().max() < 0.02
    relative = (grad_w16 - grad_w32).norm() / grad_w32.norm()
    assert 0 < relative < 0.01, relative  # bfloat16 keeps 8 bits: ~0.4% per rounding
    if with_bias:
        assert (grad_b16 - grad_b32).norm() / grad_b32.norm() < 0.01


def test_bfloat16_evaluation_of_a_near_certain_word_is_exact_and_never_negative():
    """When the target holds almost all the mass, -log p = log(1 + sum_{v != t} e^(l_v - l_t))
    is ~0: the rounded logits of the other words cannot push it below zero."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(50, 8, generator=gen)
    weight = torch.randn(30, 8, generator=gen) * 0.1
    targets = torch.full((50,), 7)
    bias = torch.zeros(30)
    bias[7] = 40.3  # ~40 nats above every other word
    with torch.no_grad():
        exact = linear_cross_entropy(hidden, weight, bias, targets)
        fast = linear_cross_entropy(hidden, weight, bias, targets, compute_dtype=torch.bfloat16)
    assert (fast >= 0).all()
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-12)
