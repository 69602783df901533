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
        return torch.cat([self.joint_log_prob(b).argmax(dim=1) for b in _blocks(z)])

    def posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` responsibilities p(k | z_i)."""
        return torch.cat([torch.softmax(self.joint_log_prob(b), dim=1) for b in _blocks(z)])

    def hyperprior_log_prob(self) -> torch.Tensor:
        """log p(phi): softball on means + Dirichlet on weights + N(-2 log sigma0, 1) on log-precisions."""
        return (
            self.mean_prior.log_prob(self.means).sum()
            + dirichlet_log_prob(self.log_weights(), self.alpha)
            + normal_log_prob(self.log_precision, self.log_precision_prior_mean).sum()
        )

    @torch.no_grad()
    def sufficient_statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Responsibility-weighted ``(sum r, sum r z, sum r z^2)`` of ``z`` (``[K]``, ``[K, L]``,
        ``[K, L]``, float64) and the cells each component holds (argmax, ``[K]``): all the M-step
        needs, so blocks and workers just add them."""
        joint = self.joint_log_prob(z)
        r = torch.softmax(joint, dim=1).double()
        zd = z.double()
        held = torch.bincount(joint.argmax(1), minlength=self.n_components).double()
        return r.sum(0), r.T @ zd, r.T @ (zd * zd), held

    @torch.no_grad()
    def maximize(self, n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, held: torch.Tensor | None = None, *,
                 prior_weight: float, min_cells: float = 1.0) -> list[int]:
        """Set means, log-precisions and weights to the maximum of
        ``sum_i log p(z_i | phi) + prior_weight * log p(phi)`` given the statistics (one EM M-step).

        Weights: pi_k ~ n_k + w (alpha - 1). Means: the weighted means pulled by the softball prior
        (concave; solved by bisection on the norm, alternated with the precisions until both settle). Log-precisions: the 1-D concave problem
        ``n_k (nu / 2 - e^nu v / 2) - w (nu - nu0)^2 / 2`` solved by Newton steps, so a prior counted
        once per cell (``w = N``) keeps variances near sigma0 exactly as the gradient path does.
        A component that holds fewer than ``min_cells`` cells (``held``: argmax counts; else its
        responsibility mass) is re-seeded by splitting the largest one along its widest axis
        (returned, so the history can report it), not left to drift: a component can keep
        responsibility mass while sitting under a broader one that takes all its cells.
        """
        n, s1, s2 = n.double(), s1.double(), s2.double()
        k, w = self.n_components, float(prior_weight)
        size = n if held is None else held.double()
        dead = [int(i) for i in torch.nonzero(size < min_cells).flatten()]
        live = size >= min_cells
        centre = torch.where((n > 0)[:, None], s1 / n.clamp_min(1e-12)[:, None], self.means.double())
        nu0 = self.log_precision_prior_mean
        nu = self.log_precision.double().clone()
        # an isotropic nu is shared by the dim axes: its data term counts dim times
        nk = (n * (self.dim if self.isotropic else 1))[:, None].expand_as(nu)
        mean = centre
        for _ in range(20):  # means and precisions are coupled through the softball: alternate
            mean = self._maximize_means(n, centre, w, nu) if w > 0 else centre
            var = (s2 / n.clamp_min(1e-12)[:, None] - 2 * mean * centre + mean**2).clamp_min(1e-12)
            if self.isotropic:
                var = var.mean(1, keepdim=True)
            previous = nu
            for _ in range(50):  # Newton on a concave 1-D objective per entry; converges in a few steps
                grad = 0.5 * nk * (1.0 - torch.exp(nu) * var) - w * (nu - nu0)
                hess = -0.5 * nk * torch.exp(nu) * var - w
                step = grad / hess
                nu = nu - step.clamp(-5.0, 5.0)
                if float(step.abs().max()) < 1e-12:
                    break
            if w == 0 or float((nu - previous).abs().max()) < 1e-10:
                break
        nu = torch.where((n > 0)[:, None], nu, self.log_precision.double())
        counts = (n + w * (self.alpha - 1.0)).clamp_min(1e-3 * float(n.sum()) / k)
        for d in dead:  # split the largest live component in two along its widest axis
            big = int(torch.argmax(torch.where(live, size, torch.zeros_like(size))))
            axis = int(torch.argmin(nu[big]))  # smallest log-precision: the widest axis
            offset = torch.zeros(self.dim, dtype=mean.dtype, device=mean.device)
            offset[axis if not self.isotropic else 0] = float(torch.exp(-0.5 * nu[big, axis]))
            mean[d], mean[big] = mean[big] + offset, mean[big] - offset
            nu[d] = nu[big]
            counts[big] = counts[d] = counts[big] / 2
            live[d] = True
        self.means.copy_(mean.to(self.means.dtype))
        self.log_precision.copy_(nu.to(self.log_precision.dtype))
        self.logits.copy_(torch.log(counts / counts.sum()).to(self.logits.dtype))
        return dead

    def _maximize_means(self, n: torch.Tensor, centre: torch.Tensor, w: float, nu: torch.Tensor) -> torch.Tensor:
        """argmax_mu sum_k n_k log N(centre_k | mu_k, e^-nu_k) + w sum_k log softball(mu_k).

        Concave; stationary where mu_l = n P_l c_l / (n P_l + w g(r) / r), r = ||mu||, g the
        softball's radial slope. So only r is unknown, one number per component, and
        ||mu(r)|| - r changes sign once on (0, ||c||]: bisection, vectorised over components
        (closed form rather than a generic optimiser: 100x faster, and this runs every epoch).
        """
        precision = n[:, None] * torch.exp(nu).expand(self.n_components, self.dim)
        a, radius = self.mean_prior.sharpness, self.mean_prior.radius

        def mean_at(r: torch.Tensor) -> torch.Tensor:
            slope = (a / radius) * torch.sigmoid(a * (r / radius - 1.0))
            return precision * centre / (precision + w * (slope / r)[:, None])

        lo = torch.zeros(self.n_components, dtype=centre.dtype, device=centre.device)
        hi = torch.linalg.vector_norm(centre, dim=1).clamp_min(1e-12)
        for _ in range(60):  # 2^-60 of the bracket: exact in float64
            mid = 0.5 * (lo + hi)
            above = torch.linalg.vector_norm(mean_at(mid), dim=1) > mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return mean_at(0.5 * (lo + hi).clamp_min(1e-300))

    def sample(self, n: int, component: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw representations from one component or from the whole mixture."""
        with torch.no_grad():
            if component is None:
                comps = torch.multinomial(torch.exp(self.log_weights()), n, replacement=True, generator=generator)
            else:
                comps = torch.full((n,), int(component), dtype=torch.long)
            std = torch.exp(-0.5 * self.log_precision.expand(self.n_components, self.dim))[comps]
            return self.means[comps] + std * torch.randn(n, self.dim, generator=generator)


def _blocks(z: torch.Tensor, rows: int = 16_384) -> list[torch.Tensor]:
    """Row blocks of ``z``: the component terms are ``[rows, K, L]``, so a whole atlas at once
    (200k cells, K = 10, L = 20) would allocate ~0.5 GB of temporaries."""
    return [z] if len(z) <= rows else list(torch.split(z, rows))
