"""A linear-Gaussian latent variable model whose every quantity is known in closed form.

    data            x ~ N(m, S_x)                       (the "data distribution", dx dimensions)
    encoder         q(z|x) = N(A x + b, diag(s))         (s: variances, D dimensions)
    prior           p(z) = N(0, I)
    decoder         p(x|z) = N(W z + c, Psi)

Because everything is Gaussian (in float64), the thesis's quantities have exact answers:

    aggregate posterior   q(z) = N(A m + b, S_z),  S_z = A S_x A' + diag(s)
    rate                  R = E_x KL(q(z|x) || p(z))
    index-code MI         I_q(X;Z) = 1/2 log det S_z - 1/2 sum_d log s_d
    marginal KL           KL(q(z) || p(z))                 (= R - I_q)
    distortion            D = -E_x E_q(z|x) log p(x|z)
    data entropy          H = 1/2 log det(2 pi e S_x)      (differential entropy; exact)
    log-likelihood        log p(x) = log N(x; c, W W' + Psi)
    lower gap             E_q(z) KL(q(x|z) || p(x|z)),  q(x|z) the Gaussian conditional of q(x, z)
    TC, dim-wise KL       of q(z), as in Chen et al. (2018)

The model implements :class:`~tvae_core.protocols.LatentVariableModel` (batches ``{"x": [B, dx]}``,
one "token" per example) so every estimator in :mod:`tvae_core.estimators` runs on it unchanged.
Four constructors give the cases the estimators must get right: :meth:`fitted` (q is the exact
posterior and the data are the model's marginal: both gaps are 0), :meth:`collapsed` (A = 0,
I_q = 0), :meth:`high_mutual_information` (I_q >> log N: the aggregate-posterior ceiling binds),
and :meth:`mismatched` (an imperfect encoder: marginal KL > 0 and lower gap > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch.distributions import MultivariateNormal, Normal

from .estimators.decomposition import MIBoundDecomposition, mi_bound_decomposition

LOG_2PI = math.log(2 * math.pi)


def _logdet(matrix: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.linalg.cholesky(matrix).diagonal().log().sum()


def _gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL(N(mean0, cov0) || N(mean1, cov1)) in nats."""
    diff = mean1 - mean0
    solve = torch.linalg.solve
    return float(0.5 * (torch.trace(solve(cov1, cov0)) + diff @ solve(cov1, diff) - mean0.numel()
                        + _logdet(cov1) - _logdet(cov0)))


@dataclass(frozen=True, eq=False)
class LinearGaussianLVM:
    data_mean: torch.Tensor        # m   [dx]
    data_cov: torch.Tensor         # S_x [dx, dx]
    encoder_weight: torch.Tensor   # A   [D, dx]
    encoder_bias: torch.Tensor     # b   [D]
    encoder_var: torch.Tensor      # s   [D]  variances of q(z|x)
    decoder_weight: torch.Tensor   # W   [dx, D]
    decoder_bias: torch.Tensor     # c   [dx]
    decoder_cov: torch.Tensor      # Psi [dx, dx]
    name: str = "linear-Gaussian"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                if not torch.isfinite(value).all():
                    raise ValueError(f"{f.name} must be finite")
                object.__setattr__(self, f.name, value.detach().to(torch.float64))
        dx, d = self.data_mean.shape[0], self.encoder_bias.shape[0]
        expected = dict(data_cov=(dx, dx), encoder_weight=(d, dx), encoder_var=(d,),
                        decoder_weight=(dx, d), decoder_bias=(dx,), decoder_cov=(dx, dx))
        for key, shape in expected.items():
            if tuple(getattr(self, key).shape) != shape:
                raise ValueError(f"{key} must have shape {shape} (data_dim={dx}, latent_dim={d}); "
                                 f"got {tuple(getattr(self, key).shape)}")
        if not (self.encoder_var > 0).all():
            raise ValueError("encoder_var must be > 0 (variances of q(z|x))")
        for key in ("data_cov", "decoder_cov"):
            if torch.linalg.cholesky_ex(getattr(self, key)).info != 0:
                raise ValueError(f"{key} must be symmetric positive definite")

    # ------------------------------------------------------------------ sizes
    @property
    def latent_dim(self) -> int:
        return self.encoder_bias.shape[0]

    @property
    def data_dim(self) -> int:
        return self.data_mean.shape[0]

    # ------------------------------------------------------------------ the protocol
    def encode(self, batch: dict[str, torch.Tensor]) -> Normal:
        """q(z|x) = N(A x + b, diag(s)), batch shape ``[B, D]``."""
        x = self._x(batch)
        loc = x @ self.encoder_weight.T + self.encoder_bias                    # [B, D]
        return Normal(loc, self.encoder_var.sqrt().expand_as(loc))

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log N(x; W z + c, Psi). ``z [S, B, D]`` -> ``[S, B]``."""
        x = self._x(batch)
        if z.dim() != 3 or z.shape[1:] != (x.shape[0], self.latent_dim):
            raise ValueError(f"z must have shape [S, B={x.shape[0]}, D={self.latent_dim}]; "
                             f"got {tuple(z.shape)}")
        residual = x - (z.double() @ self.decoder_weight.T + self.decoder_bias)   # [S, B, dx]
        chol = torch.linalg.cholesky(self.decoder_cov)
        white = torch.linalg.solve_triangular(chol, residual.reshape(-1, self.data_dim).T,
                                              upper=False).T                       # [S*B, dx]
        log_prob = (-0.5 * white.pow(2).sum(-1) - chol.diagonal().log().sum()
                    - 0.5 * self.data_dim * LOG_2PI)
        return log_prob.reshape(z.shape[:2])

    def num_predicted_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One "token" per example: per-token numbers equal per-sequence numbers. ``[B]``"""
        return torch.ones(self._x(batch).shape[0], dtype=torch.long)

    def _x(self, batch) -> torch.Tensor:
        if "x" not in batch:
            raise KeyError(f"batch must have key 'x' of shape [B, {self.data_dim}]; got keys {list(batch)}")
        x = batch["x"].double()
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"batch['x'] must have shape [B, {self.data_dim}]; got {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------ data
    def sample_data(self, num_points: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_points`` draws x ~ N(m, S_x): ``[n, dx]`` float64."""
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be an int >= 1; got {num_points!r}")
        eps = torch.randn(num_points, self.data_dim, generator=generator, dtype=torch.float64)
        return self.data_mean + eps @ torch.linalg.cholesky(self.data_cov).T

    @staticmethod
    def batches(x: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Split ``x [n, dx]`` into protocol batches ``{"x": [B, dx]}``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        return [{"x": chunk} for chunk in x.split(batch_size)]

    # ------------------------------------------------------------------ distributions
    def aggregate_posterior(self) -> MultivariateNormal:
        """q(z) = N(A m + b, A S_x A' + diag(s))."""
        a = self.encoder_weight
        cov = a @ self.data_cov @ a.T + torch.diag(self.encoder_var)
        return MultivariateNormal(a @ self.data_mean + self.encoder_bias, covariance_matrix=cov)

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(c, W W' + Psi)."""
        w = self.decoder_weight
        return MultivariateNormal(self.decoder_bias, covariance_matrix=w @ w.T + self.decoder_cov)

    def true_posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """p(z|x) = N(Sigma W' Psi^-1 (x - c), Sigma), Sigma = (I + W' Psi^-1 W)^-1. Batch ``[B]``."""
        w = self.decoder_weight
        psi_inv_w = torch.linalg.solve(self.decoder_cov, w)                        # [dx, D]
        cov = torch.linalg.inv(torch.eye(self.latent_dim, dtype=torch.float64) + w.T @ psi_inv_w)
        loc = (x.double() - self.decoder_bias) @ psi_inv_w @ cov                    # [B, D]
        return MultivariateNormal(loc, covariance_matrix=cov)

    # ------------------------------------------------------------------ exact terms
    def rate(self, x: torch.Tensor | None = None):
        """KL(q(z|x) || p(z)) per point ``[B]`` for ``x``, or its data expectation R (float)."""
        s = self.encoder_var
        if x is not None:
            loc = self.encode({"x": x}).loc
            return 0.5 * (loc.pow(2) + s - 1.0 - s.log()).sum(-1)
        return float(self.rate_per_dimension().sum())

    def rate_per_dimension(self) -> torch.Tensor:
        """E_x KL(q(z_d|x) || N(0, 1)) per dimension ``[D]``."""
        a, s = self.encoder_weight, self.encoder_var
        mean = a @ self.data_mean + self.encoder_bias
        return 0.5 * (s + self.active_unit_variances() + mean.pow(2) - 1.0 - s.log())

    def active_unit_variances(self) -> torch.Tensor:
        """Var_x E_q[z_d] = diag(A S_x A'), the quantity thresholded for active units: ``[D]``."""
        a = self.encoder_weight
        return (a @ self.data_cov @ a.T).diagonal()

    def distortion(self, x: torch.Tensor | None = None):
        """-E_q(z|x) log p(x|z) per point ``[B]`` for ``x``, or its data expectation D (float)."""
        w, psi = self.decoder_weight, self.decoder_cov
        noise = torch.trace(torch.linalg.solve(psi, w @ torch.diag(self.encoder_var) @ w.T))
        const = 0.5 * (self.data_dim * LOG_2PI + _logdet(psi) + noise)
        a_map = torch.eye(self.data_dim, dtype=torch.float64) - w @ self.encoder_weight   # I - W A
        offset = w @ self.encoder_bias + self.decoder_bias
        if x is not None:
            residual = x.double() @ a_map.T - offset                                      # [B, dx]
            return const + 0.5 * (residual * torch.linalg.solve(psi, residual.T).T).sum(-1)
        mean = a_map @ self.data_mean - offset
        cov = a_map @ self.data_cov @ a_map.T
        return float(const + 0.5 * (torch.trace(torch.linalg.solve(psi, cov))
                                    + mean @ torch.linalg.solve(psi, mean)))

    def elbo(self, x: torch.Tensor | None = None):
        """ELBO = -(distortion + rate), per point ``[B]`` or in expectation (float)."""
        if x is not None:
            return -(self.distortion(x) + self.rate(x))
        return -(self.distortion() + self.rate())

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(x; c, W W' + Psi) per point: ``[B]``."""
        return self.marginal().log_prob(x.double())

    def expected_log_marginal(self) -> float:
        """E_data log p(x) = -H - KL(data || p(x))."""
        marginal = self.marginal()
        return -self.entropy() - _gaussian_kl(self.data_mean, self.data_cov, marginal.loc,
                                              marginal.covariance_matrix)

    def posterior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z|x)) per point, computed directly (not as log p(x) - ELBO): ``[B]``."""
        q, p = self.encode({"x": x}), self.true_posterior(x)
        q_full = MultivariateNormal(q.loc, covariance_matrix=torch.diag(self.encoder_var))
        return torch.distributions.kl_divergence(q_full, p)

    def entropy(self) -> float:
        """H = 1/2 log det(2 pi e S_x), the exact differential entropy of the data (nats)."""
        return float(0.5 * (self.data_dim * (LOG_2PI + 1.0) + _logdet(self.data_cov)))

    def mutual_information(self) -> float:
        """I_q(X;Z) = H[q(z)] - E_x H[q(z|x)] = 1/2 log det S_z - 1/2 sum_d log s_d."""
        cov = self.aggregate_posterior().covariance_matrix
        return float(0.5 * (_logdet(cov) - self.encoder_var.log().sum()))

    def marginal_kl(self) -> float:
        """KL(q(z) || N(0, I))."""
        q = self.aggregate_posterior()
        eye = torch.eye(self.latent_dim, dtype=torch.float64)
        return _gaussian_kl(q.loc, q.covariance_matrix, torch.zeros_like(q.loc), eye)

    def total_correlation(self) -> float:
        """KL(q(z) || prod_d q(z_d)) = 1/2 (sum_d log S_z,dd - log det S_z)."""
        cov = self.aggregate_posterior().covariance_matrix
        return float(0.5 * (cov.diagonal().log().sum() - _logdet(cov)))

    def dimensionwise_kl(self, per_dimension: bool = False):
        """sum_d KL(q(z_d) || N(0, 1)) (float), or the ``[D]`` terms."""
        q = self.aggregate_posterior()
        var, mean = q.covariance_matrix.diagonal(), q.loc
        terms = 0.5 * (var + mean.pow(2) - 1.0 - var.log())
        return terms if per_dimension else float(terms.sum())

    def lower_gap(self) -> float:
        """E_q(z) KL(q(x|z) || p(x|z)), from the Gaussian joint q(x, z) (independently of I_q, H, D).

        q(x|z) = N(m + K (z - mu_z), C), K = S_x A' S_z^-1, C = S_x - K A S_x.
        """
        q = self.aggregate_posterior()
        mu_z, cov_z = q.loc, q.covariance_matrix
        a, cov_x, psi = self.encoder_weight, self.data_cov, self.decoder_cov
        gain = torch.linalg.solve(cov_z, a @ cov_x).T                              # K [dx, D]
        cond_cov = cov_x - gain @ a @ cov_x                                        # C [dx, dx]
        cond_cov = 0.5 * (cond_cov + cond_cov.T)
        slope = self.decoder_weight - gain                                         # W - K
        mean_diff = slope @ mu_z + self.decoder_bias - (self.data_mean - gain @ mu_z)
        expected_quad = (torch.trace(torch.linalg.solve(psi, slope @ cov_z @ slope.T))
                         + mean_diff @ torch.linalg.solve(psi, mean_diff))
        return float(0.5 * (torch.trace(torch.linalg.solve(psi, cond_cov)) + expected_quad
                            - self.data_dim + _logdet(psi) - _logdet(cond_cov)))

    def bound_decomposition(self) -> MIBoundDecomposition:
        """H - D <= I_q <= R with the exact H, D, R, I_q and marginal KL (entropy_is_exact=True)."""
        return mi_bound_decomposition(self.entropy(), self.distortion(), self.rate(),
                                      self.mutual_information(), self.marginal_kl(),
                                      entropy_is_exact=True)

    def summary(self) -> dict[str, float]:
        """Every exact scalar, for tables."""
        return dict(entropy=self.entropy(), distortion=self.distortion(), rate=self.rate(),
                    elbo=self.elbo(), expected_log_marginal=self.expected_log_marginal(),
                    mutual_information=self.mutual_information(), marginal_kl=self.marginal_kl(),
                    lower_gap=self.lower_gap(), total_correlation=self.total_correlation(),
                    dimensionwise_kl=self.dimensionwise_kl())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def fitted(cls, latent_dim: int = 8, data_dim: int = 16, noise_std: float = 1.0,
               loading_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
               name: str = "fitted") -> "LinearGaussianLVM":
        """A consistent VAE: data ~ the decoder's marginal and q(z|x) = p(z|x) exactly.

        W = U diag(lambda) with orthonormal U (so the true posterior is diagonal), Psi = noise_std^2 I,
        lambda spread over ``loading_range``. Then -ELBO = H, both gaps are 0 and
        I_q = R = 1/2 sum_d log(1 + lambda_d^2 / noise_std^2).
        """
        if not (isinstance(latent_dim, int) and isinstance(data_dim, int) and 1 <= latent_dim <= data_dim):
            raise ValueError(f"need ints 1 <= latent_dim <= data_dim; got latent_dim={latent_dim!r}, "
                             f"data_dim={data_dim!r}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0; got {noise_std!r}")
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=generator,
                                               dtype=torch.float64))              # U [dx, D]
        loadings = torch.linspace(*loading_range, latent_dim, dtype=torch.float64)  # lambda [D]
        weight = basis * loadings                                                  # W [dx, D]
        bias = 0.5 * torch.randn(data_dim, generator=generator, dtype=torch.float64)
        noise_var = noise_std ** 2
        post_var = 1.0 / (1.0 + loadings.pow(2) / noise_var)                      # s [D]
        enc_weight = (post_var * loadings / noise_var)[:, None] * basis.T          # A [D, dx]
        eye = torch.eye(data_dim, dtype=torch.float64)
        return cls(data_mean=bias, data_cov=weight @ weight.T + noise_var * eye,
                   encoder_weight=enc_weight, encoder_bias=-enc_weight @ bias, encoder_var=post_var,
                   decoder_weight=weight, decoder_bias=bias, decoder_cov=noise_var * eye, name=name)

    @classmethod
    def collapsed(cls, latent_dim: int = 8, data_dim: int = 16, noise_std: float = 1.0,
                  loading_range: tuple[float, float] = (0.5, 2.0), seed: int = 0) -> "LinearGaussianLVM":
        """Posterior collapse: q(z|x) = p(z) (A = 0) and a decoder that ignores z and models the
        data alone (W = 0, Psi = S_x). I_q = R = marginal KL = 0, D = H, -ELBO = H.
        Same data distribution as :meth:`fitted` with the same arguments."""
        ref = cls.fitted(latent_dim, data_dim, noise_std, loading_range, seed)
        return cls(data_mean=ref.data_mean, data_cov=ref.data_cov,
                   encoder_weight=torch.zeros_like(ref.encoder_weight),
                   encoder_bias=torch.zeros(latent_dim), encoder_var=torch.ones(latent_dim),
                   decoder_weight=torch.zeros_like(ref.decoder_weight), decoder_bias=ref.data_mean,
                   decoder_cov=ref.data_cov, name="collapsed")

    @classmethod
    def high_mutual_information(cls, latent_dim: int = 8, data_dim: int = 16, noise_std: float = 1.0,
                                loading_range: tuple[float, float] = (25.0, 100.0),
                                seed: int = 0) -> "LinearGaussianLVM":
        """A fitted model with strong loadings: posterior variances s = 1/(1 + lambda^2/noise^2) are
        tiny and I_q = 1/2 sum_d log(1 + lambda_d^2 / noise_std^2) >> log N for any feasible N
        (about 32 nats with the defaults). Large loadings rather than little noise keep H and D
        positive, like the text case."""
        return cls.fitted(latent_dim, data_dim, noise_std, loading_range, seed, name="high MI")

    @classmethod
    def mismatched(cls, latent_dim: int = 8, data_dim: int = 16, noise_std: float = 1.0,
                   loading_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
                   encoder_gain: float = 1.5, encoder_shift: float = 0.5,
                   encoder_var_scale: float = 0.5, encoder_rotation: float = 0.5) -> "LinearGaussianLVM":
        """The fitted decoder with an imperfect encoder: the mean map rotated in latent space by a
        random rotation of angle scale ``encoder_rotation`` (so q(z) has correlated coordinates:
        total correlation > 0) and scaled by ``encoder_gain``, b + ``encoder_shift``, and
        s x ``encoder_var_scale`` (over-confident). Marginal KL > 0 and lower gap > 0."""
        ref = cls.fitted(latent_dim, data_dim, noise_std, loading_range, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        skew = torch.randn(latent_dim, latent_dim, generator=generator, dtype=torch.float64)
        rotation = torch.linalg.matrix_exp(encoder_rotation * (skew - skew.T) / 2)   # [D, D]
        return cls(data_mean=ref.data_mean, data_cov=ref.data_cov,
                   encoder_weight=encoder_gain * rotation @ ref.encoder_weight,
                   encoder_bias=rotation @ ref.encoder_bias + encoder_shift,
                   encoder_var=encoder_var_scale * ref.encoder_var,
                   decoder_weight=ref.decoder_weight, decoder_bias=ref.decoder_bias,
                   decoder_cov=ref.decoder_cov, name="mismatched")
