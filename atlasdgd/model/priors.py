"""Hyper-priors of the Gaussian mixture: softball on means, Dirichlet on weights, normal on log-precisions."""

from __future__ import annotations

import math

import numpy as np
import torch


def softball_log_normalizer(dim: int, radius: float, sharpness: float) -> float:
    """Exact log of the integral over R^dim of 1 / (1 + exp(a (||x|| / R - 1))).

    The DGD papers use the volume of the R-ball, the a -> infinity limit; at a = 5 that is ~13%
    off in 2-D. The exact value (a 1-D radial integral) keeps log p(phi) a true density.
    """
    log_sphere = math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)
    return float(log_sphere + dim * math.log(radius) + math.log(_radial_integral(dim, sharpness)))


def _radial_integral(dim: int, sharpness: float, pieces: int = 64, nodes: int = 32) -> float:
    """int_0^inf u^(dim-1) / (1 + exp(a (u - 1))) du by composite Gauss-Legendre on [0, 1 + 60 / a]
    (the tail beyond is below e^-60). Numpy rather than scipy's quad so the model imports with torch
    and numpy alone; the integrand is smooth, and agreement with quad to 1e-12 is tested."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    upper = 1.0 + 60.0 / sharpness
    # both halves [0, 1] and [1, upper] in equal pieces: the logistic edge at u = 1 is a piece boundary
    edges = np.concatenate([np.linspace(0.0, 1.0, pieces // 2 + 1), np.linspace(1.0, upper, pieces // 2 + 1)[1:]])
    lo, hi = edges[:-1, None], edges[1:, None]
    u = (lo + hi) / 2 + (hi - lo) / 2 * x[None, :]
    f = u ** (dim - 1) / (1.0 + np.exp(sharpness * (u - 1.0)))
    return float(((hi - lo) / 2 * w[None, :] * f).sum())


class SoftballPrior:
    """Nearly uniform density on the ball of radius R with a logistic edge of sharpness a."""

    def __init__(self, dim: int, radius: float, sharpness: float):
        self.dim, self.radius, self.sharpness = dim, float(radius), float(sharpness)
        self.log_norm = softball_log_normalizer(dim, radius, sharpness)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of each row of ``x`` (``[..., dim]``)."""
        norm = torch.linalg.vector_norm(x, dim=-1)
        return -self.log_norm - torch.nn.functional.softplus(self.sharpness * (norm / self.radius - 1.0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform samples inside the ball (the spec's initialisation of component means)."""
        direction = torch.randn(n, self.dim, generator=generator)
        direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        u = torch.rand(n, 1, generator=generator)
        return direction * self.radius * u ** (1.0 / self.dim)


def dirichlet_log_prob(log_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Symmetric Dirichlet(alpha) log density of mixture weights given as log pi."""
    k = log_weights.shape[-1]
    const = math.lgamma(k * alpha) - k * math.lgamma(alpha)
    return const + (alpha - 1.0) * log_weights.sum(-1)


def normal_log_prob(x: torch.Tensor, mean: float, std: float = 1.0) -> torch.Tensor:
    """Element-wise log N(x | mean, std^2)."""
    return -0.5 * math.log(2 * math.pi) - math.log(std) - 0.5 * ((x - mean) / std) ** 2
