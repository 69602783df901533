"""Rows of a CSR matrix written densely into a given array: the loader's one copy per batch.

Why not ``x[rows].toarray(out=...)``: scipy's row indexing and densification spend most of their time
in Python checks around two C++ kernels. On a window of 4,096 cells x 2,000 genes (3M non-zeros),
``x[rows]`` for 128 sorted rows took ~250 us, of which the row-copy kernel ~105 us
(cProfile: index dtype checks, index validation and the result's constructor took the rest). Here the
same two kernels (``csr_row_index``, ``csr_todense``) are called directly. They are private to scipy,
so any matrix or scipy version they do not fit goes the public way, with the same result.
"""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def _kernels():
    """scipy's (csr_row_index, csr_todense), or None where this scipy does not have them."""
    try:
        from scipy.sparse import _sparsetools

        return _sparsetools.csr_row_index, _sparsetools.csr_todense
    except (ImportError, AttributeError):
        return None


def gather_dense(x, rows: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``out[i] = x[rows[i]]`` with zeros written too, for a scipy CSR ``x`` and an ``out`` of
    ``len(rows)`` rows and ``x``'s dtype. Returns the gathered rows' ``(indptr, indices, data)``, fresh arrays (nothing
    shared with ``x``, whose buffers may be reused)."""
    rows = np.asarray(rows)
    n_rows, n_columns = x.shape
    if out.shape != (len(rows), n_columns):
        raise ValueError(f"out has shape {out.shape}, the rows need {(len(rows), n_columns)}")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        raise IndexError(f"rows must lie in [0, {n_rows})")
    indptr, indices, data = x.indptr, x.indices, x.data
    kernels = _kernels()
    if (kernels is None or indptr.dtype != indices.dtype or indptr.dtype not in (np.int32, np.int64)
            or data.dtype != out.dtype or not out.flags.c_contiguous):
        return _gather_public(x, rows, out)
    row_index, todense = kernels
    rows = rows.astype(indptr.dtype, copy=False)
    lengths = indptr[rows + 1] - indptr[rows]
    new_indptr = np.empty(len(rows) + 1, dtype=indptr.dtype)
    new_indptr[0] = 0
    np.cumsum(lengths, out=new_indptr[1:])
    nnz = int(new_indptr[-1])
    new_indices, new_data = np.empty(nnz, dtype=indices.dtype), np.empty(nnz, dtype=data.dtype)
    row_index(len(rows), rows, indptr, indices, data, new_indices, new_data)
    out[...] = 0
    todense(len(rows), n_columns, new_indptr, new_indices, new_data, out)
    return new_indptr, new_indices, new_data


def _gather_public(x, rows: np.ndarray, out: np.ndarray):
    """The same through scipy's public API (row indexing by an array always copies)."""
    part = x[rows]
    part.toarray(out=out)
    return part.indptr, part.indices, part.data
