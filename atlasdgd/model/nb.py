"""Negative-binomial log-likelihood in the mean/dispersion parameterisation.

    log NB(x | mu, r) = lgamma(x + r) - lgamma(r) - lgamma(x + 1)
                        + x log(mu / (mu + r)) + r log(r / (mu + r))

Single-cell counts are 60-99% zeros and for x = 0 only the last term survives, so
:func:`nb_log_prob_rows` evaluates the lgamma terms only at the non-zero entries. :func:`nb_log_prob`
is the plain element-wise form (used for per-feature metrics and as the reference the sparse path is
tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Element-wise log NB(x | mu, r); ``r`` broadcasts over cells (shape ``[F]``)."""
    log_mu_r = torch.log(mu + r)
    return (
        torch.lgamma(x + r)
        - torch.lgamma(r)
        - torch.lgamma(x + 1.0)
        + torch.xlogy(x, mu)
        - x * log_mu_r
        + r * (torch.log(r) - log_mu_r)
    )


def nb_log_prob_rows(
    x: torch.Tensor,
    log_fraction: torch.Tensor,
    library: torch.Tensor,
    r: torch.Tensor,
    nonzeros: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-cell sum over features of log NB(x_ij | s_i y_ij, r_j), exploiting sparsity.

    Args:
        x: counts, dense ``[B, F]``.
        log_fraction: ``log y`` from a log-softmax over features, ``[B, F]``.
        library: library size ``s`` per cell, ``[B]``.
        r: dispersion per feature, ``[F]``.
        nonzeros: ``(rows, cols, values)`` of the non-zero counts of ``x`` (the loader has them from
            its CSR blocks; stored zeros are harmless). Found with ``torch.nonzero`` when None.

    Returns ``[B]``. With ``t = log(mu / r)`` the terms that do not vanish at x = 0 are
    ``x t - (x + r) softplus(t)``: one transcendental per entry, dense, with a hand-written backward
    (:class:`_DenseTerms`). The lgamma terms run on the non-zeros only,
    ``lgamma(r)`` once per feature. (A table for ``lgamma(x + 1)`` was slower than lgamma: its integer checks cost more.)
    """
    dense = _DenseTerms.apply(log_fraction, torch.log(library.clamp_min(1e-12)).detach(), r, x.detach())
    if nonzeros is None:
        rows, cols = torch.nonzero(x, as_tuple=True)
        xv = x[rows, cols]
    else:
        rows, cols, xv = nonzeros
    nz = torch.lgamma(xv + r.index_select(0, cols)) - torch.lgamma(r).index_select(0, cols) - torch.lgamma(xv.detach() + 1.0)
    return dense.index_add(0, rows, nz)


class _DenseTerms(torch.autograd.Function):
    """Per cell ``sum_j x_ij t_ij - (x_ij + r_j) softplus(t_ij)`` with ``t = log_fraction + log s - log r``.

    Written out because autograd's version makes ~19 passes over the ``[B, F]`` block (every
    element-wise op and its backward); this makes 4 forward and 6 backward, with the two feature
    sums as matrix-vector products (measured ~2x faster on the dense part, a CPU step ~15% faster).
    dL/dt = x - (x + r) sigmoid(t), and sigmoid(t) = exp(t - softplus(t)) reuses the forward's work.
    """

    @staticmethod
    def forward(ctx, log_fraction, log_s, r, x):
        t = log_fraction + (log_s[:, None] - torch.log(r))
        sp = F.softplus(t)
        log_sigmoid = t.sub_(sp)  # t - softplus(t), in place: t is not needed again
        out = torch.bmm(x.unsqueeze(1), log_sigmoid.unsqueeze(2)).view(-1) - sp @ r
        ctx.save_for_backward(log_sigmoid, sp, r, x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        log_sigmoid, sp, r, x = ctx.saved_tensors
        g = torch.exp(log_sigmoid).mul_(x + r)
        g = torch.sub(x, g, out=g)  # dL/dt, [B, F]
        grad_r = None
        if ctx.needs_input_grad[2]:
            grad_r = -(grad_out @ sp) - (grad_out @ g) / r
        grad_fraction = g.mul_(grad_out[:, None]) if ctx.needs_input_grad[0] else None
        return grad_fraction, None, grad_r, None
