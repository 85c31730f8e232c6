"""The typed result of a mixed membership fit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MixedMembershipConfig
from .model import group_log_density


@dataclass(frozen=True)
class MixedMembershipResult:
    """What a fit returns; every per-group number is evaluated on that group's held-out split.

    ``marginal_kl[g] = mean_{z in heldout_g} [log q_hat_g(z) - log p(z)]``, ``p = N(0, I)``.
    In expectation this is ``KL(q_g || p) - KL(q_g || q_hat_g) <= KL(q_g || p)``: a misfit of the
    MMM lowers the estimate, so a prior group scores ``-KL(p || q_hat_prior) <= 0``; that value is
    the estimator's calibration floor (:meth:`calibration_floor`). Components are shared, so
    groups that differ from the prior by a few tenths of a nat can share the prior's component
    and score near the floor.
    """

    group_names: tuple[str, ...]
    weights: torch.Tensor            # [G, T] mixing weights, rows sum to 1 (meanfield: mean)
    marginal_kl: torch.Tensor        # [G] nats
    marginal_kl_se: torch.Tensor     # [G] Monte Carlo standard error over the held-out samples
    index_code_mi: torch.Tensor | None  # [G] rate - marginal_kl; NaN where no rate was given
    rates: torch.Tensor | None       # [G] the rates passed in (NaN where missing)
    loss_trace: torch.Tensor         # [num_steps] negative ELBO, nats summed over all observations
    fit_seconds: float               # SVI time (initialisation + steps), excluding evaluation
    num_fit: tuple[int, ...]         # samples per group used for fitting
    num_heldout: tuple[int, ...]     # samples per group used for evaluation
    posterior: dict[str, torch.Tensor]  # global params, each [S, ...] (S = 1 for MAP)
    posterior_weights: torch.Tensor  # [S, G, T]
    config: MixedMembershipConfig
    calibration_group: str | None = None

    def index(self, group: str) -> int:
        if group not in self.group_names:
            raise ValueError(f"group={group!r} is not a fitted group; accepted values: "
                             f"{self.group_names}")
        return self.group_names.index(group)

    def log_density(self, group: str, z: torch.Tensor) -> torch.Tensor:
        """``log q_hat_group(z)``: ``z`` ``[N, D]`` -> ``[N]`` (meanfield: posterior predictive)."""
        g = self.index(group)
        with torch.no_grad():
            return group_log_density(self.posterior_weights[:, g], self.posterior,
                                     self.config.family, z.to(torch.float32))

    def calibration_floor(self, group: str | None = None) -> tuple[float, float]:
        """``(marginal_kl, se)`` of a group of prior samples: what the estimator reports when
        the true answer is 0. Defaults to the ``calibration_group`` given to the fit."""
        group = group if group is not None else self.calibration_group
        if group is None:
            raise ValueError("calibration group is None: pass group=... or fit with "
                             "calibration_group=...")
        g = self.index(group)
        return float(self.marginal_kl[g]), float(self.marginal_kl_se[g])

    def to_frame(self):
        """One row per group: marginal KL (+ SE), rate, index-code MI, sample counts."""
        import pandas as pd

        frame = pd.DataFrame({
            "group": list(self.group_names),
            "marginal_kl": self.marginal_kl.tolist(),
            "marginal_kl_se": self.marginal_kl_se.tolist(),
            "rate": self.rates.tolist() if self.rates is not None else float("nan"),
            "index_code_mi": (self.index_code_mi.tolist() if self.index_code_mi is not None
                              else float("nan")),
            "num_fit": list(self.num_fit),
            "num_heldout": list(self.num_heldout),
        })
        return frame.set_index("group")

    def weights_frame(self):
        """Mixing weights ``[G, T]`` as a DataFrame (rows: groups, columns: component index)."""
        import pandas as pd

        return pd.DataFrame(self.weights.numpy(), index=list(self.group_names),
                            columns=range(self.weights.shape[1]))
