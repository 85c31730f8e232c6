"""Kernel two-sample test between samples of q(z) and p(z) (Gretton et al., 2012).

Unbiased MMD^2 with a Gaussian kernel whose bandwidth comes from the median heuristic (the median
pairwise distance of the pooled sample), averaged over a small grid of multiples of it; the
p-value is from a permutation test with a seeded generator. (The original code used fixed
bandwidths far too small for 32 dimensions, where every kernel value is ~0 and the test is blind.)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import check_finite, check_int_at_least, check_positive_float

MEDIAN_MAX_POINTS = 2000   # the median heuristic looks at most at this many pooled points


@dataclass(frozen=True)
class MMDTestResult:
    """Unbiased MMD^2 (mean of Gaussian kernels over ``bandwidths``) and its permutation p-value.

    p = (1 + #{permuted MMD^2 >= observed}) / (1 + num_permutations): a valid p-value (uniform or
    conservative under H0: both samples from one distribution). The per-bandwidth numbers are
    diagnostics only; choosing the smallest of them afterwards would not be a valid test.
    """
    mmd2: float
    p_value: float
    bandwidths: tuple[float, ...]
    median_bandwidth: float
    mmd2_per_bandwidth: tuple[float, ...]
    p_value_per_bandwidth: tuple[float, ...]
    num_permutations: int
    num_x: int
    num_y: int


def _check_samples(x: torch.Tensor, y: torch.Tensor) -> None:
    check_finite("x", x)
    check_finite("y", y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [n, D] and [m, D] with the same D; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"x and y need >= 2 samples each for the unbiased MMD^2; "
                         f"got n = {x.shape[0]}, m = {y.shape[0]}")


def median_heuristic_bandwidth(x: torch.Tensor, y: torch.Tensor,
                               generator: torch.Generator | None = None) -> float:
    """Median Euclidean distance between distinct points of the pooled sample (on at most
    ``MEDIAN_MAX_POINTS`` randomly chosen points: above that, the median of a random subsample,
    drawn with ``generator``). Scales with sqrt(D), as a bandwidth must."""
    _check_samples(x, y)
    pooled = torch.cat([x, y]).double()                                        # [n+m, D]
    if pooled.shape[0] > MEDIAN_MAX_POINTS:
        pooled = pooled[torch.randperm(pooled.shape[0], generator=generator)[:MEDIAN_MAX_POINTS]]
    distances = torch.cdist(pooled, pooled)                                    # [P, P]
    upper = distances[torch.triu_indices(*distances.shape, offset=1).unbind()]
    median = float(upper.median())
    if not median > 0:
        raise ValueError("the median pairwise distance is 0 (most samples coincide); "
                         "pass bandwidths explicitly")
    return median


def _squared_distances(pooled: torch.Tensor) -> torch.Tensor:
    return torch.cdist(pooled, pooled).pow(2)                                  # [P, P]


def _gaussian_kernel(squared_distances: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(a, b) = exp(-|a - b|^2 / (2 h^2)): ``[P, P]`` with a unit diagonal."""
    return torch.exp(squared_distances / (-2.0 * bandwidth * bandwidth))


def _mmd2_for_labels(kernel: torch.Tensor, labels: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Unbiased MMD^2 for many labellings at once. ``kernel [P, P]`` (unit diagonal),
    ``labels [R, P]`` (1 = first sample) -> ``[R]``.

    sum_{i != j in X} k = v'Kv - n;  sum_{i != j in Y} k = u'Ku - m;  sum_{X,Y} k = v'Ku, u = 1 - v.
    """
    kv = kernel @ labels.T                                                     # [P, R]
    vkv = (labels.T * kv).sum(0)                                               # [R]
    vk1 = labels @ kernel.sum(1)                                               # [R]
    uku = kernel.sum() - 2.0 * vk1 + vkv                                       # [R]
    return ((vkv - n) / (n * (n - 1)) + (uku - m) / (m * (m - 1))
            - 2.0 * (vk1 - vkv) / (n * m))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> float:
    """Unbiased MMD^2 (Gretton et al., 2012, eq. 3) with the mean of Gaussian kernels over
    ``bandwidths``, ``k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2))``::

        MMD^2_u = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(nm) sum_{i,j} k(x_i, y_j).

    Unbiased for MMD^2 (so it can be slightly negative), which is 0 exactly when the two
    distributions are equal (the kernel is characteristic); cost O((n+m)^2 D)."""
    _check_samples(x, y)
    if len(bandwidths) == 0:
        raise ValueError("bandwidths=[] is not accepted; accepted values: a non-empty sequence of numbers > 0")
    for h in bandwidths:
        check_positive_float("every bandwidth", h)
    squared = _squared_distances(torch.cat([x, y]).double())
    labels = torch.cat([torch.ones(x.shape[0]), torch.zeros(y.shape[0])]).double()[None]
    # MMD^2 is linear in the kernel: the mean kernel's MMD^2 is the mean of the per-bandwidth ones
    return float(sum(_mmd2_for_labels(_gaussian_kernel(squared, h), labels, x.shape[0], y.shape[0])
                     for h in bandwidths) / len(bandwidths))


def mmd_permutation_test(x: torch.Tensor, y: torch.Tensor, *,
                         bandwidth_multipliers: Sequence[float] = (0.5, 1.0, 2.0),
                         bandwidths: Sequence[float] | None = None, num_permutations: int = 500,
                         generator: torch.Generator | None = None,
                         permutation_chunk: int = 100) -> MMDTestResult:
    """Two-sample test of H0: x and y come from the same distribution (e.g. q(z) vs p(z)).

    Statistic: unbiased MMD^2 with k = mean over h in ``bandwidths`` of ``exp(-|a-b|^2 / (2 h^2))``,
    h = median heuristic x ``bandwidth_multipliers`` unless ``bandwidths`` is given. The mean of
    Gaussian kernels is characteristic, so the test is consistent against every alternative.
    p-value by ``num_permutations`` random relabellings of the pooled sample (exact level, up to
    the 1/(R+1) resolution). Cost O((n+m)^2 (D + G R)); memory O((n+m)^2 + R (n+m)).
    """
    _check_samples(x, y)
    check_int_at_least("num_permutations", num_permutations, 1)
    check_int_at_least("permutation_chunk", permutation_chunk, 1)
    median = median_heuristic_bandwidth(x, y, generator)
    if bandwidths is None:
        if not bandwidth_multipliers:
            raise ValueError("bandwidth_multipliers must be a non-empty sequence of floats > 0")
        bandwidths = tuple(median * check_positive_float("every bandwidth multiplier", c)
                           for c in bandwidth_multipliers)
    else:
        bandwidths = tuple(check_positive_float("every bandwidth", h) for h in bandwidths)
        if not bandwidths:
            raise ValueError("bandwidths must be None or a non-empty sequence of floats > 0")
    n, m = x.shape[0], y.shape[0]
    squared = _squared_distances(torch.cat([x, y]).double())                   # [P, P]
    observed_labels = torch.cat([torch.ones(n), torch.zeros(m)]).double()
    order = torch.stack([torch.randperm(n + m, generator=generator) for _ in range(num_permutations)])
    labels = torch.cat([observed_labels[None], observed_labels[order]])       # [1 + R, P], row 0 observed
    per_bandwidth = torch.zeros(len(bandwidths), 1 + num_permutations, dtype=torch.float64)
    for g, h in enumerate(bandwidths):          # one P x P kernel in memory at a time
        kernel = _gaussian_kernel(squared, h)
        for start in range(0, labels.shape[0], permutation_chunk):
            chunk = labels[start:start + permutation_chunk]
            per_bandwidth[g, start:start + chunk.shape[0]] = _mmd2_for_labels(kernel, chunk, n, m)
        del kernel
    statistic = per_bandwidth.mean(0)           # the mean kernel's MMD^2, [1 + R]
    observed = per_bandwidth[:, 0]
    exceed_mean = int((statistic[1:] >= statistic[0] - 1e-12).sum())
    exceed = (per_bandwidth[:, 1:] >= observed[:, None] - 1e-12).sum(1)
    return MMDTestResult(
        mmd2=float(statistic[0]), p_value=(1 + exceed_mean) / (1 + num_permutations),
        bandwidths=tuple(float(h) for h in bandwidths), median_bandwidth=median,
        mmd2_per_bandwidth=tuple(float(v) for v in observed),
        p_value_per_bandwidth=tuple(float((1 + e) / (1 + num_permutations)) for e in exceed),
        num_permutations=num_permutations, num_x=n, num_y=m)
