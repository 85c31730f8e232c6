"""Fit time and accuracy of the mixed membership model at thesis size.

19 groups x 1000 samples x 32 dims, T = 10, for the R^1 and R^D families. The groups mimic the
thesis' line-up (prior, VAE, AE, 5 x FB, 5 x MDR, 5 x CYC-FB) but are synthetic with a known
marginal KL to N(0, I): analytic for Gaussians, a 200k-sample Monte Carlo estimate with the true
density for mixtures. Run: ``.venv/bin/python benchmarks/bench_mmm.py [--steps N] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import distributions as td

from tvae_core.allocator import keep_freed_memory
from tvae_core.mmm import MixedMembershipConfig, fit_mixed_membership

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step

D, N, T = 32, 1000, 10


def synthetic_groups(seed: int = 0):
    """``{name: true distribution q_g}`` with q_g's parameters drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    zeros, ones = torch.zeros(D), torch.ones(D)
    groups = {
        "prior": td.Independent(td.Normal(zeros, ones), 1),
        "prior (calibration)": td.Independent(td.Normal(zeros, ones), 1),
        "VAE": td.Independent(td.Normal(zeros, ones), 1),   # collapsed: q(z) = p(z)
        # AE: far from the prior in every dimension
        "AE": td.Independent(td.Normal(2.0 * torch.randn(D, generator=gen), 2.0 * ones), 1),
    }
    for k, sep in enumerate((0.8, 1.2, 1.6, 2.0, 2.4)):
        # FB: bimodal along a few directions (holes in the aggregate posterior)
        centre = torch.zeros(D)
        centre[: 2 * (k + 1)] = sep / math.sqrt(2)
        groups[f"FB {k + 1}"] = td.MixtureSameFamily(
            td.Categorical(probs=torch.tensor([0.5, 0.5])),
            td.Independent(td.Normal(torch.stack([centre, -centre]), 0.8 * ones), 1))
    for k, rho in enumerate((0.05, 0.1, 0.15, 0.2, 0.25)):
        # MDR: close to the prior, mildly correlated
        factor = rho * torch.randn(D, 1, generator=gen)
        groups[f"MDR {k + 1}"] = td.LowRankMultivariateNormal(zeros, factor, ones)
    for k, shift in enumerate((0.2, 0.3, 0.4, 0.5, 0.6)):
        # CYC-FB: shifted and shrunk
        groups[f"CYC-FB {k + 1}"] = td.Independent(
            td.Normal(shift * ones, (1 - shift / 2) * ones), 1)
    return groups


def true_kl(q, num_mc: int = 200_000) -> float:
    prior = td.Independent(td.Normal(torch.zeros(D), torch.ones(D)), 1)
    try:
        return float(td.kl_divergence(q, prior))
    except NotImplementedError:
        z = q.sample((num_mc,))
        return float((q.log_prob(z) - prior.log_prob(z)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="default: the config default")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--families", default="R1,RD")
    args = parser.parse_args()
    torch.manual_seed(0)
    distributions = synthetic_groups()
    samples = {name: q.sample((N,)) for name, q in distributions.items()}
    truth = {name: true_kl(q) for name, q in distributions.items()}

    rows, timing, traces = {}, [], []
    for family in args.families.split(","):
        overrides = {} if args.steps is None else {"num_steps": args.steps}
        config = MixedMembershipConfig(family=family, num_components=T, **overrides)
        cpu, wall = time.process_time(), time.perf_counter()
        result = fit_mixed_membership(samples, config, calibration_group="prior (calibration)",
                                      progress=False, num_threads=args.threads)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        loss = result.loss_trace
        tail = max(1, len(loss) // 10)  # flatness: last 10% of steps vs the 10% before
        last, before = loss[-tail:].mean(), loss[-2 * tail:-tail].mean()
        change = float((before - last) / last.abs())
        floor, floor_se = result.calibration_floor()
        timing.append((family, config.num_steps, result.fit_seconds, wall, cpu, change, floor,
                       floor_se))
        checkpoints = [0, len(loss) // 4, len(loss) // 2, 3 * len(loss) // 4, len(loss) - 1]
        traces.append((family, [(i + 1, float(loss[i])) for i in checkpoints]))
        for name, kl, se in zip(result.group_names, result.marginal_kl, result.marginal_kl_se):
            rows.setdefault(name, {})[family] = (float(kl), float(se))

    print(f"\n{len(samples)} groups x {N} samples x {D} dims, T = {T}, "
          f"torch threads = {args.threads}")
    print(f"{'family':<7}{'steps':>6}{'fit s':>8}{'total s':>9}{'cpu s':>8}"
          f"{'rel. loss change (last 10%)':>30}{'floor (calib. prior)':>24}")
    for family, steps, fit_s, wall, cpu, change, floor, se in timing:
        print(f"{family:<7}{steps:>6}{fit_s:>8.1f}{wall:>9.1f}{cpu:>8.1f}{change:>30.1e}"
              f"{floor:>17.3f} +- {se:.3f}")
    print("\nloss trace (negative ELBO, nats) at steps:")
    for family, points in traces:
        print(f"{family:<7}" + "  ".join(f"{step}: {value:,.0f}" for step, value in points))
    families = [t[0] for t in timing]
    print(f"\n{'group':<22}{'true KL':>9}" + "".join(f"{f + ' KL (se)':>20}" for f in families))
    for name in samples:
        cells = "".join(f"{rows[name][f][0]:>12.2f} ({rows[name][f][1]:.2f})" for f in families)
        print(f"{name:<22}{truth[name]:>9.2f}{cells}")


if __name__ == "__main__":
    main()
