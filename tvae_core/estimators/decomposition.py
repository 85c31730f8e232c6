"""The bounds on mutual information and their two gaps, for one trained model.

    H - D  <=  I_q(X; Z)  <=  R                                            (Alemi et al., 2018)

    lower gap = I_q - (H - D) = E_q(z) KL(q(x|z) || p(x|z))
    upper gap = R - I_q       = KL(q(z) || p(z))                          (Hoffman & Johnson, 2016)
    lower gap + upper gap     = D + R - H = -ELBO - H = KL(q(x, z) || p(x, z))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ENTROPY_PROXY_NOTE = ("H is a proxy: the cross-entropy of the best available language model on "
                      "held-out data, an UPPER bound on the true data entropy. H - D is then not a "
                      "guaranteed lower bound on I_q, and the lower gap is under-stated by "
                      "(proxy - true H), possibly below zero.")
ENTROPY_EXACT_NOTE = "H is the exact data entropy: H - D is a guaranteed lower bound on I_q."


@dataclass(frozen=True)
class MIBoundDecomposition:
    """The MI bounds H - D <= I_q <= R of one model and how far each is from I_q (nats per sequence).

    ``entropy`` is exact only when ``entropy_is_exact`` (e.g. the analytic model). For text it is
    a *proxy* -- the held-out cross-entropy of the best available language model, an upper bound
    on the true entropy H -- so ``lower_bound`` = H - D is then NOT a guaranteed lower bound on
    I_q (it may exceed it) and ``lower_gap`` is too small by (proxy - true H), possibly negative;
    ``entropy_note`` says which case applies.

    Two numerical checks: ``upper_gap_discrepancy`` = (R - I_q) - marginal KL, zero when R, I_q
    and marginal KL are consistent (R = I_q + KL(q(z)||p(z)), Hoffman & Johnson 2016); and
    ``identity_discrepancy`` = (lower gap + marginal KL) - (-ELBO - H), the identity checked with
    the separately estimated marginal KL.
    """
    entropy: float
    entropy_is_exact: bool
    entropy_note: str
    distortion: float
    rate: float
    negative_elbo: float           # D + R
    mutual_information: float
    marginal_kl: float
    lower_bound: float             # H - D
    upper_bound: float             # R
    lower_gap: float               # I_q - (H - D) = E_q(z) KL(q(x|z) || p(x|z))
    upper_gap: float               # R - I_q       = KL(q(z) || p(z))
    gaps_sum: float                # lower gap + marginal KL
    identity_discrepancy: float    # gaps_sum - (-ELBO - H)
    upper_gap_discrepancy: float   # (R - I_q) - marginal KL


def mi_bound_decomposition(entropy: float, distortion: float, rate: float, mutual_information: float,
                           marginal_kl: float, *, entropy_is_exact: bool = False) -> MIBoundDecomposition:
    """Bounds and gaps from H, D, R, I_q and KL(q(z)||p(z)); all in nats per sequence.

    ``entropy_is_exact=False`` (the default) labels H as a language-model proxy (see the result's
    docstring). Every input must be a finite float.
    """
    values = dict(entropy=entropy, distortion=distortion, rate=rate,
                  mutual_information=mutual_information, marginal_kl=marginal_kl)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float (nats per sequence); got {value!r}")
    entropy, distortion, rate = float(entropy), float(distortion), float(rate)
    mutual_information, marginal_kl = float(mutual_information), float(marginal_kl)
    negative_elbo = distortion + rate
    lower_gap = mutual_information - (entropy - distortion)
    gaps_sum = lower_gap + marginal_kl
    return MIBoundDecomposition(
        entropy=entropy, entropy_is_exact=bool(entropy_is_exact),
        entropy_note=ENTROPY_EXACT_NOTE if entropy_is_exact else ENTROPY_PROXY_NOTE,
        distortion=distortion, rate=rate, negative_elbo=negative_elbo,
        mutual_information=mutual_information, marginal_kl=marginal_kl,
        lower_bound=entropy - distortion, upper_bound=rate,
        lower_gap=lower_gap, upper_gap=rate - mutual_information, gaps_sum=gaps_sum,
        identity_discrepancy=gaps_sum - (negative_elbo - entropy),
        upper_gap_discrepancy=(rate - mutual_information) - marginal_kl)
