"""Bayesian mixed membership model (MMM) of latent sample groups, in Pyro.

Groups are sets of latent samples (prior draws, and z ~ q(z|x) for held-out sentences per
trained model). ``T`` components are shared by all groups; each group mixes them with its own
weights from a truncated Dirichlet-process (stick-breaking) prior. From the fit, per group, on
held-out samples: ``log q_hat_g(z)``, the marginal KL ``KL(q_g || p)`` with a standard error, the
index-code MI ``R_g - KL_g`` and the mixing-weight matrix (thesis, slides 34-35).

Usage::

    config = MixedMembershipConfig(family="RD", num_components=10)
    result = fit_mixed_membership({"prior": z_prior, "prior (calibration)": z_cal, "MDR": z_mdr},
                                  config, rates={"MDR": 16.0},
                                  calibration_group="prior (calibration)")
    result.to_frame(); result.weights_frame(); result.calibration_floor()

:func:`latent_sample_groups` builds those groups from trained runs' posteriors, the same way for
every page that fits the MMM.
"""
from .config import FAMILIES, GUIDES, SCALE_PRIORS, MixedMembershipConfig
from .fit import fit_mixed_membership, prior_samples, split_heldout, validate_samples
from .groups import CALIBRATION, PRIOR, latent_sample_groups
from .model import group_log_density, mmm_model, stick_breaking
from .result import MixedMembershipResult

__all__ = [
    "CALIBRATION", "FAMILIES", "GUIDES", "PRIOR", "SCALE_PRIORS", "MixedMembershipConfig", "MixedMembershipResult",
    "fit_mixed_membership", "group_log_density", "latent_sample_groups", "mmm_model", "prior_samples",
    "split_heldout", "stick_breaking", "validate_samples",
]
