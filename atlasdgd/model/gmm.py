"""Gaussian mixture over representations, with the DGD hyper-priors.

Covariances are diagonal and stored as negative log-variances (log-precisions) ``nu``;
isotropic mixtures (the covariate models) share one ``nu`` per component.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atlasdgd.model.priors import SoftballPrior, dirichlet_log_prob, normal_log_prob


class GaussianMixture(nn.Module):
    def __init__(
        self,
        n_components: int,
        dim: int,
        *,
        radius: float = 2.0,
        sharpness: float = 5.0,
        alpha: float = 1.0,
        sigma0: float | None = None,
        isotropic: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if n_components < 1 or dim < 1:
            raise ValueError(f"a mixture needs n_components >= 1 and dim >= 1, got {n_components}, {dim}")
        self.n_components, self.dim, self.isotropic, self.alpha = n_components, dim, isotropic, alpha
        self.mean_prior = SoftballPrior(dim, radius, sharpness)
        # Not rounded (the reference rounds sigma0 to two decimals and breaks for K >= 81).
        self.set_sigma0(sigma0 if sigma0 is not None else 0.2 * radius / n_components)
        self.means = nn.Parameter(self.mean_prior.sample(n_components, generator))
        self.log_precision = nn.Parameter(
            torch.full((n_components, 1 if isotropic else dim), self.log_precision_prior_mean)
        )
        self.logits = nn.Parameter(torch.zeros(n_components))

    def set_sigma0(self, sigma0: float) -> None:
        """Scale of the log-precision prior N(-2 log sigma0, 1)."""
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0}")
        self.sigma0 = float(sigma0)
        self.log_precision_prior_mean = -2.0 * math.log(self.sigma0)

    def log_weights(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=0)

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: log N_k(z_i), without the mixture weights."""
        nu = self.log_precision.expand(self.n_components, self.dim)
        sq = ((z[:, None, :] - self.means[None]) ** 2 * torch.exp(nu)[None]).sum(-1)
        return -0.5 * self.dim * math.log(2 * math.pi) + 0.5 * nu.sum(-1)[None] - 0.5 * sq

    def joint_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: log pi_k + log N_k(z_i); its argmax over k is the cell's cluster."""
        return self.log_weights()[None] + self.component_log_prob(z)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``[B]``: log p(z_i) = logsumexp_k [log pi_k + log N_k(z_i)]."""
        return torch.logsumexp(self.joint_log_prob(z), dim=1)

    def class_log_prob(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``[B]``: supervised score log pi_c + log N_c(z_i) of each cell's own class c."""
        nu = self.log_precision.expand(self.n_components, self.dim)[classes]
        sq = ((z - self.means[classes]) ** 2 * torch.exp(nu)).sum(-1)
        log_n = -0.5 * self.dim * math.log(2 * math.pi) + 0.5 * nu.sum(-1) - 0.5 * sq
        return self.log_weights()[classes] + log_n

    def cluster(self, z: torch.Tensor) -> torch.Tensor:
        return self.joint_log_prob(z).argmax(dim=1)

    def posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` responsibilities p(k | z_i)."""
        return torch.softmax(self.joint_log_prob(z), dim=1)

    def hyperprior_log_prob(self) -> torch.Tensor:
        """log p(phi): softball on means + Dirichlet on weights + N(-2 log sigma0, 1) on log-precisions."""
        return (
            self.mean_prior.log_prob(self.means).sum()
            + dirichlet_log_prob(self.log_weights(), self.alpha)
            + normal_log_prob(self.log_precision, self.log_precision_prior_mean).sum()
        )

    def sample(self, n: int, component: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw representations from one component or from the whole mixture."""
        with torch.no_grad():
            if component is None:
                comps = torch.multinomial(torch.exp(self.log_weights()), n, replacement=True, generator=generator)
            else:
                comps = torch.full((n,), int(component), dtype=torch.long)
            std = torch.exp(-0.5 * self.log_precision.expand(self.n_components, self.dim))[comps]
            return self.means[comps] + std * torch.randn(n, self.dim, generator=generator)
