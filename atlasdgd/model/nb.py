"""Negative-binomial log-likelihood in the mean/dispersion parameterisation.

    log NB(x | mu, r) = lgamma(x + r) - lgamma(r) - lgamma(x + 1)
                        + x log(mu / (mu + r)) + r log(r / (mu + r))

Single-cell counts are 60-99% zeros and for x = 0 only the last term survives, so
:func:`nb_log_prob_rows` evaluates the lgamma terms only at the non-zero entries. :func:`nb_log_prob`
is the plain element-wise form (used for per-feature metrics and as the reference the sparse path is
tested against). Training needs the lgamma terms only summed over the batch (they depend on the
dispersions and counts, never on a cell's representation): :func:`count_terms_total` reads them from
a :class:`CountSummary` the loader builds off the step's path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        nonzeros: ``(rows, cols, values)`` of the non-zero counts of ``x``, rows in non-decreasing order
            (the loader has them from its CSR blocks; stored zeros are harmless). Found with
            ``torch.nonzero`` when None.

    Returns ``[B]``. With ``t = log(mu / r)`` the terms that do not vanish at x = 0 are
    ``x t - (x + r) softplus(t)``: one transcendental per entry, dense, with a hand-written backward
    (:class:`_DenseTerms`). The lgamma terms run on the non-zeros only, read from a per-feature table
    (:func:`count_term_sums`). Counts must be integers (the data checks say so before training).
    """
    rows, cols, xv = nonzero_entries(x) if nonzeros is None else nonzeros
    return dense_terms(x, log_fraction, library, r) + count_term_sums(xv, rows, cols, r, x.shape[0])


def dense_terms(x: torch.Tensor, log_fraction: torch.Tensor, library: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per cell, the terms of log NB that do not vanish at x = 0 (see :func:`nb_log_prob_rows`): ``[B]``."""
    return _DenseTerms.apply(log_fraction, torch.log(library.clamp_min(1e-12)).detach(), r, x.detach())


def nonzero_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, values)`` of the non-zeros of dense counts, rows in order (row-major search)."""
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols]


TABLE_COUNTS = 32  # largest count read from the table; larger ones (<1% of RNA non-zeros) use lgamma


def count_term_sums(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, r: torch.Tensor, n_rows: int,
                    table_counts: int = TABLE_COUNTS) -> torch.Tensor:
    """Per row, the sum of ``lgamma(x + r_j) - lgamma(r_j) - lgamma(x + 1)`` over the entries ``(rows, cols, x)``
    (integer counts, rows in non-decreasing order as a CSR matrix or ``torch.nonzero`` lists them): ``[n_rows]``."""
    return _CountTermSums.apply(r, rows, cols, x.detach(), n_rows, table_counts)


@dataclass
class CountSummary:
    """A batch's non-zero counts of one modality as the sum of their lgamma terms needs them.

    For integer x, ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) = sum_{k<x} log((r + k) / (k + 1))``: a
    ``[F, C]`` table of cumulative sums over k, so summed over a batch's entries it is the table weighted
    by the histogram of ``(feature, count)``, plus, for the few counts above the summary's width C, their
    remainder from C. Built by the loader from its CSR blocks
    (:func:`atlasdgd.data.count_summary.summarize_counts`), it replaces the per-entry gather, segment sum
    and scatter of :func:`count_term_sums` in a training step with a few ``[F, C]`` operations, and
    needs no host sync on a GPU.
    """

    histogram: torch.Tensor  # [F, C] float32: entries of feature j with count min(x, C) = v + 1
    large_cols: torch.Tensor  # [L] long: features of the entries with count > C
    large_values: torch.Tensor  # [L] float32: their counts

    @property
    def width(self) -> int:
        return int(self.histogram.shape[1])

    def to(self, device: torch.device, non_blocking: bool = True) -> "CountSummary":
        return CountSummary(*(t.to(device, non_blocking=non_blocking)
                              for t in (self.histogram, self.large_cols, self.large_values)))


def count_terms_total(summary: CountSummary, r: torch.Tensor) -> torch.Tensor:
    """The sum over the summarised entries of ``lgamma(x + r_j) - lgamma(r_j) - lgamma(x + 1)`` (a scalar,
    differentiable in ``r``; autograd's backward is a few ``[F, C]`` passes and a digamma per large count)."""
    capped = histogram_terms_total(summary.histogram, r)
    if summary.large_values.numel() == 0:
        return capped
    return capped + large_count_terms(summary.large_cols, summary.large_values, r, summary.width).sum()


def histogram_terms_total(histogram: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The part of :func:`count_terms_total` read from the histogram (counts above its width C count as C)."""
    c = histogram.shape[1]
    k = torch.arange(c, dtype=r.dtype, device=r.device)
    table = torch.cumsum(torch.log(r[:, None] + k) - torch.log1p(k), 1)  # column v: count v + 1
    return (histogram.to(r.dtype) * table).sum()


def large_count_terms(cols: torch.Tensor, values: torch.Tensor, r: torch.Tensor, width: int) -> torch.Tensor:
    """The rest of :func:`count_terms_total` for counts above the histogram's width C, per entry:
    ``lgamma(x + r) - lgamma(r + C) - lgamma(x + 1) + lgamma(C + 1)`` (zero at x = C, so a fixed-size
    buffer can be padded with such entries: the compiled step does)."""
    x, rl = values.to(r.dtype), r.index_select(0, cols)
    return torch.lgamma(x + rl) - torch.lgamma(rl + width) - torch.lgamma(x + 1.0) + math.lgamma(width + 1.0)


class _CountTermSums(torch.autograd.Function):
    """The lgamma terms of the non-zeros, summed per row, with their gradient in ``r`` written out.

    For integer x, ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) = sum_{k<x} log(r + k) - log x!``: a
    ``[F, c + 1]`` table of cumulative sums (c = min(largest count, ``table_counts``)) read at
    ``(col, x)``; counts above c add the lgamma difference from c. The table's derivative in r is the
    cumulative sum of ``1 / (r + k)``, so the backward needs no digamma per entry (lgamma and digamma per
    entry were ~15% of a CPU training step) and no autograd graph over the table. The row sums are a
    segment sum over the entries, whose rows must be in order: an ``index_add`` into the rows was
    ~0.37 ms of a 128 x 2,000 CPU step (serial there), ``segment_reduce`` 0.15, a sparse CSR
    matrix-vector product 0.05 (not used: a beta API whose invariants want each row's columns sorted and
    distinct, which a user's CSR need not be). Against the autograd version with ``index_add``: training
    steps 1.02-1.05x faster (20k x 2,000 simulated cells, 2 threads, medians of 30-40 alternating pairs
    in one process, two runs). Stored zeros read the table's column of zeros.
    """

    @staticmethod
    def forward(ctx, r, rows, cols, x, n_rows, table_counts):
        largest = int(x.max()) if x.numel() else 0
        c = max(1, min(largest, table_counts))
        shifted = r.detach()[:, None] + torch.arange(c, dtype=r.dtype, device=r.device)  # [F, c]: r_j + k
        k_factorial = torch.lgamma(torch.arange(2, c + 2, dtype=r.dtype, device=r.device))
        table = F.pad(torch.cumsum(torch.log(shifted), 1) - k_factorial, (1, 0)).reshape(-1)  # column v: x = v
        capped = x if largest <= c else x.clamp(max=c)
        flat = cols * (c + 1) + capped.to(cols.dtype)  # int32 from the loader: no int64 copies
        offsets = torch.searchsorted(rows, torch.arange(n_rows + 1, dtype=rows.dtype, device=rows.device))
        out = torch.segment_reduce(table.index_select(0, flat), "sum", offsets=offsets)
        above = above_slope = None
        if largest > c:
            above = torch.nonzero(x > c).squeeze(1)
            xa, ra = x.index_select(0, above).to(r.dtype), r.detach().index_select(0, cols.index_select(0, above))
            rest = torch.lgamma(xa + ra) - torch.lgamma(ra + c) - torch.lgamma(xa + 1.0) + math.lgamma(c + 1.0)
            out.index_add_(0, rows.index_select(0, above), rest)
            above_slope = torch.digamma(xa + ra) - torch.digamma(ra + c)  # few entries: digamma is fine here
        ctx.save_for_backward(shifted, flat, rows, cols, above, above_slope)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        shifted, flat, rows, cols, above, above_slope = ctx.saved_tensors
        per_entry = grad_out.index_select(0, rows)
        read = torch.zeros(shifted.numel() + shifted.shape[0], dtype=grad_out.dtype, device=grad_out.device)
        read.index_add_(0, flat, per_entry)  # upstream gradient summed per table cell
        slope = F.pad(torch.cumsum(shifted.reciprocal(), 1), (1, 0))  # d table / d r_j
        grad_r = (read.view_as(slope) * slope).sum(1)
        if above is not None:
            grad_r.index_add_(0, cols.index_select(0, above), per_entry.index_select(0, above) * above_slope)
        return grad_r, None, None, None, None, None


class _DenseTerms(torch.autograd.Function):
    """Per cell ``sum_j x_ij t_ij - (x_ij + r_j) softplus(t_ij)`` with ``t = log_fraction + log s - log r``.

    Written out because autograd's version makes ~19 passes over the ``[B, F]`` block (every
    element-wise op and its backward); this makes 4 forward and 6 backward, with the feature sums
    as a row-wise dot product and matrix-vector products (measured ~2x faster on the dense part, a CPU step ~15% faster).
    dL/dt = x - (x + r) sigmoid(t), and sigmoid(t) = exp(t - softplus(t)) reuses the forward's work.
    """

    @staticmethod
    def forward(ctx, log_fraction, log_s, r, x):
        t = log_fraction + (log_s[:, None] - torch.log(r))
        sp = F.softplus(t)
        log_sigmoid = t.sub_(sp)  # t - softplus(t), in place: t is not needed again
        # vecdot: a batched [1, F] x [F, 1] bmm took 8x longer on CPU (0.55 vs 0.07 ms at 128 x 2,000, measured)
        out = torch.linalg.vecdot(x, log_sigmoid) - sp @ r
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
