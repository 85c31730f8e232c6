"""The language-model head fused with its cross-entropy, computed in blocks of rows.

For the default model the head (hidden 64 -> 10k words) is most of a training step and almost
all of an importance-weighted evaluation. Done the plain way, ``F.cross_entropy(h @ W.T, t)``
writes an ``[M, V]`` logit matrix (~28 MB in float32 for one default batch's ~700 target tokens,
gigabytes for an IW chunk), reads it back for the log-softmax, writes that as large again, and
keeps it for the backward pass: the step is bound by memory
traffic, not arithmetic. Here each block of ``block_rows`` rows goes through
matmul -> log-softmax -> gather while its logits are still in cache; with gradients, each
block's float32 logits are kept for the backward pass, which turns them into the gradient instead
of computing the same matmul again (the same gradients, bit for bit; the speed-up is measured in
``benchmarks/README.md``):

    nll_m = logsumexp_v (h_m . w_v + b_v) - (h_m . w_{t_m} + b_{t_m})
    d nll_m / d h_m = sum_v (softmax_v - [v = t_m]) w_v,   d / d w_v = sum_m (softmax_v - [v = t_m]) h_m

The numbers equal the plain computation to float rounding (tested, values and gradients);
``benchmarks/bench_core.py`` measures the speed-up side by side.

``compute_dtype=torch.bfloat16`` runs the vocabulary matmuls in bfloat16 with float32
accumulation (3.9x faster per block on a CPU with AVX512-BF16, measured, 64 x 64 x 10k),
recomputes each target's own logit exactly in float32, and takes the log-softmax in float32. In
training (mixed precision for the head only) the backward pass reads the kept float32 logits, and
its two matmuls (d/dh, d/dW) run in bfloat16 too; d/dW and d/db are summed over blocks in
float32. The default profile trains this way (``TrainConfig.lm_head_dtype``): a training step is
1.5x faster on one thread (0.094 -> 0.062 s, ``benchmarks/bench_core.py``) and the weight gradient
is within 1% (relative norm) of float32's (tested).

In evaluation, measured on the default PTB models (300 test sentences, z = posterior mean, decoder
under bfloat16 autocast): a sentence's log p(x|z) moves by 0.010-0.011 nats (standard
deviation; at most 0.045) and the mean by at most 0.0005 nats, against ~130 nats per sentence.
Rounding the target logit too, as before, gave 0.031 nats (at most 0.12).

Gradient-free bfloat16 evaluation of a bias-free head (the scratch decoders' evaluation in the
default profile) goes to the compiled kernel :func:`tvae_core.native.lm_head_nll` where it is available: the same quantity
with one sweep over each block's logits instead of a float32 log-softmax, 1.7x faster per row
and within ~2e-6 nats of float64 on the same bfloat16 logits (tested, as is this module's path).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import native

DEFAULT_BLOCK_ROWS = 64  # fastest of 64..512 on the default head, 1 and 2 threads (measured)
# On a GPU a block is one kernel launch per op, so small blocks make the head launch-bound; 8,192
# rows of a 10k-word head are 330 MB of float32 logits, small next to the card's memory, and
# cover a whole training batch in one block.
ACCELERATOR_BLOCK_ROWS = 8192


def default_block_rows(device: torch.device) -> int:
    """Rows per block: cache-sized on the CPU, large on an accelerator."""
    return DEFAULT_BLOCK_ROWS if device.type == "cpu" else ACCELERATOR_BLOCK_ROWS


def _exact_target_logits(hidden, weight, bias, targets) -> torch.Tensor:
    """``h_m . w_{t_m} + b_{t_m}`` in float32, [M]: the target's own logit, computed exactly.

    With a low-precision vocabulary matmul, this replaces the target's rounded logit before the
    float32 log-softmax, so ``-log p = log(1 + sum_{v != t} exp(l_v - l_t)) >= 0``. The target logit
    enters log p(x|z) one-for-one, so its rounding would too (~0.03 nats per sentence on the default
    models); the other logits enter only through the normaliser, where their rounding errors are
    softmax-weighted and mostly cancel (0.010-0.011 nats, measured)."""
    target_logit = torch.einsum("mh,mh->m", hidden.float(), weight[targets].float())
    if bias is not None:
        target_logit += bias[targets].float()
    return target_logit


def _block_logits(h, w, b, targets_rows, exact_target_rows) -> torch.Tensor:
    """float32 logits ``[m, V]`` of one block of rows ``h`` (in the matmul's dtype, as ``w`` and
    ``b``); with ``exact_target_rows``, each target's exact logit replaces its rounded one."""
    logits = F.linear(h, w, b).float()
    if exact_target_rows is not None:
        logits.scatter_(1, targets_rows[:, None], exact_target_rows[:, None])
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, block_rows: int, compute_dtype=None):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        low_precision = compute_dtype is not None
        # a low-precision matmul is chosen here, not by an enclosing autocast region
        # with gradients, each block's float32 logits are kept for the backward pass (4 bytes per
        # row and word: ~28 MB for a default batch), which would otherwise recompute the same
        # matmul; without them (evaluation) nothing is kept, and a block's logits live only while
        # its rows are computed
        keep_logits = any(ctx.needs_input_grad[:3])
        kept_logits = []
        with torch.autocast(hidden.device.type, enabled=False) if low_precision else nullcontext():
            w, b, exact_target = weight, bias, None
            if low_precision:  # converted once, kept for the backward pass
                w = weight.to(compute_dtype)
                b = bias.to(compute_dtype) if bias is not None else None
                exact_target = _exact_target_logits(hidden, weight, bias, targets)  # [M]
            for start in range(0, hidden.shape[0], block_rows):
                rows = slice(start, start + block_rows)
                h = hidden[rows].to(compute_dtype) if low_precision else hidden[rows]
                logits = _block_logits(h, w, b, targets[rows], exact_target[rows] if low_precision else None)
                nll[rows] = F.cross_entropy(logits, targets[rows], reduction="none")
                if keep_logits:
                    kept_logits.append(logits)
        ctx.save_for_backward(hidden, weight, bias, targets, w, b)
        ctx.block_rows, ctx.compute_dtype, ctx.kept_logits = block_rows, compute_dtype, kept_logits
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, w, b = ctx.saved_tensors
        block_rows, compute_dtype, kept_logits = ctx.block_rows, ctx.compute_dtype, ctx.kept_logits
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if (need_b and bias is not None) else None
        low_precision = compute_dtype is not None
        with torch.autocast(hidden.device.type, enabled=False) if low_precision else nullcontext():
            for block, start in enumerate(range(0, hidden.shape[0], block_rows)):
                rows = slice(start, start + block_rows)
                h = hidden[rows].to(compute_dtype) if low_precision else hidden[rows]
                # the forward pass's logits, not overwritten (a second backward pass reads them too)
                dlogits = torch.softmax(kept_logits[block], dim=-1)
                dlogits[torch.arange(dlogits.shape[0], device=dlogits.device), targets[rows]] -= 1.0
                dlogits.mul_(grad_nll[rows].float().unsqueeze(1))
                d = dlogits.to(w.dtype)
                if grad_h is not None:
                    grad_h[rows] = (d @ w).to(hidden.dtype)
                if grad_w is not None:  # accumulated over blocks in float32
                    if low_precision:
                        grad_w += d.T @ h
                    else:
                        grad_w.addmm_(dlogits.T, h.float())
                if grad_b is not None:
                    grad_b.add_(dlogits.sum(0))
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


class _NativeLinearCrossEntropy(torch.autograd.Function):
    """The training head by the compiled kernels (``TrainConfig.lm_head_kernel="native"``): a
    bias-free head in bfloat16 on the CPU. The forward pass is :func:`tvae_core.native.lm_head_nll`
    (one sweep per block for the log-sum-exp) and keeps each row's log-sum-exp and each block's
    bfloat16 logits (2 bytes per row and word: ~14 MB for a default batch); the backward pass,
    :func:`tvae_core.native.lm_head_nll_backward`, turns those logits into the scaled gradient in
    place, in one sweep, with no max or sum taken again (a second backward through the same graph
    recomputes them: the first one overwrote them). The torch path takes
    several passes over each ``[rows, V]`` block in both directions (convert, log-softmax or
    softmax, scale, round); those passes, not the matmuls, were most of the head's time (torch
    profiler, one thread). Same values and gradients as :class:`_LinearCrossEntropy` to float
    rounding (tested)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
            exact_target = _exact_target_logits(hidden, weight, None, targets)  # [M] float32
            nll, ctx.logits = native.lm_head_nll_keeping_logits(h, w, targets, exact_target)
        ctx.save_for_backward(h, w, targets, exact_target, nll + exact_target)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        h, w, targets, exact_target, lse = ctx.saved_tensors
        logits, ctx.logits = ctx.logits, None  # consumed: overwritten with the gradient
        grad_h, grad_w = native.lm_head_nll_backward(h, w, targets, exact_target, lse, grad_nll, logits)
        return grad_h.to(ctx.hidden_dtype), grad_w.to(ctx.weight_dtype), None


def _native_path_applies(hidden, weight, bias, compute_dtype) -> bool:
    """Gradient-free, bias-free, bfloat16, on the CPU, and the compiled kernel is there."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return (not needs_grad and compute_dtype == torch.bfloat16 and bias is None
            and hidden.device.type == "cpu" and weight.device.type == "cpu" and native.available())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, block_rows: int | None = None,
                         compute_dtype: torch.dtype | None = None, native_training: bool = False) -> torch.Tensor:
    """Per-row negative log-likelihood ``-log softmax(hidden @ weight.T + bias)[targets]``, float32.

    hidden: [M, H], weight: [V, H], bias: [V] or None, targets: [M] -> [M]. Memory: one
    ``[block_rows, V]`` block at a time, in the forward and the backward pass (None: by the
    device, :func:`default_block_rows`). ``compute_dtype``:
    the dtype of the vocabulary matmuls (forward and backward); None or float32 keeps the weights'
    dtype. Values and gradients are float32 either way. Without gradients, in bfloat16, for a
    bias-free head on the CPU, the compiled kernel :func:`tvae_core.native.lm_head_nll` computes
    the same values (to ~2e-6 nats per row) in blocks of its own (64 rows with AVX-512).

    ``native_training`` (``TrainConfig.lm_head_kernel="native"``): with gradients, a bias-free
    bfloat16 head on the CPU trains with the compiled kernels (:class:`_NativeLinearCrossEntropy`:
    the same values and gradients to float rounding) where they are available; anything else
    keeps the torch path.
    """
    if compute_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"compute_dtype={compute_dtype} is not accepted; accepted values: "
                         "(None, torch.float32, torch.bfloat16)")
    if compute_dtype == torch.float32:
        compute_dtype = None
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [M, H] and targets [M]; got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if block_rows is None:
        block_rows = default_block_rows(hidden.device)
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows} must be >= 1")
    if _native_path_applies(hidden, weight, bias, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            target_logits = _exact_target_logits(hidden, weight, None, targets)
            return native.lm_head_nll(hidden.to(compute_dtype), weight.to(compute_dtype), targets, target_logits)
    if native_training and bias is None and compute_dtype == torch.bfloat16 and hidden.device.type == "cpu" \
            and weight.device.type == "cpu" and native.available():
        return _NativeLinearCrossEntropy.apply(hidden, weight, targets)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, block_rows, compute_dtype)
