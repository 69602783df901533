"""Reusable arrays that a loader's window of counts is read into.

A window (a few thousand cells, ~3M non-zeros at 2,000 genes) used to arrive as fresh arrays per
chunk, joined into fresh arrays again: ~50 MB of new memory per window, every page of it faulted in
(zeroed by the kernel) and, once freed, left in glibc's heap between live blocks, so the loader had to
hand free pages back (``malloc_trim``) before each window and fault them in again. Reading into the
same arrays window after window costs neither (with the loader's rarer trims and whole-chunk windows,
100k x 2,000 store: 54-56k -> 119-141k cells/s, README "Stores and scale"). A source that can decode straight into given arrays (the zarr store's ``read_window``)
fills a buffer without any copy; for the others :meth:`WindowBuffer.join` copies their blocks in.
"""

from __future__ import annotations

import numpy as np

# spare room when a buffer grows: windows differ in non-zeros by a few percent, so one growth
# usually serves the whole epoch
GROWTH = 1.25


class WindowBuffer:
    """The data and column-index arrays of one window of one modality, grown when a window needs
    more and otherwise reused. Whatever is read into it is overwritten by the next window: a batch
    must copy what it keeps (the loader's batches do)."""

    def __init__(self):
        self._data: np.ndarray | None = None
        self._indices: np.ndarray | None = None

    def arrays(self, n: int, data_dtype, index_dtype) -> tuple[np.ndarray, np.ndarray]:
        """Views of ``n`` values and ``n`` column indices, valid until the next call."""
        data, indices = self._data, self._indices
        if data is None or len(data) < n or data.dtype != data_dtype:
            data = self._data = np.empty(int(n * GROWTH) + 1, dtype=data_dtype)
        if indices is None or len(indices) < n or indices.dtype != index_dtype:
            indices = self._indices = np.empty(int(n * GROWTH) + 1, dtype=index_dtype)
        return data[:n], indices[:n]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._data, self._indices) if a is not None)

    def join(self, parts: list):
        """One CSR of the rows of ``parts`` in order, in this buffer's arrays (scipy blocks give a
        scipy matrix; a lone block is handed back as it is, no copy)."""
        if len(parts) == 1:
            return parts[0]
        spans = [(int(p.indptr[0]), int(p.indptr[-1])) for p in parts]
        total = sum(hi - lo for lo, hi in spans)
        data, indices = self.arrays(total, np.result_type(*(p.data.dtype for p in parts)),
                                    np.result_type(*(p.indices.dtype for p in parts)))
        indptr = np.empty(sum(len(p.indptr) - 1 for p in parts) + 1, dtype=index_dtype_for(total))
        indptr[0], row, offset = 0, 0, 0
        for p, (lo, hi) in zip(parts, spans):
            n = len(p.indptr) - 1
            data[offset : offset + hi - lo] = p.data[lo:hi]
            indices[offset : offset + hi - lo] = p.indices[lo:hi]
            indptr[row + 1 : row + n + 1] = p.indptr[1:] - (lo - offset)
            row, offset = row + n, offset + hi - lo
        return csr(data, indices, indptr, parts[0].shape[1] if hasattr(parts[0], "shape") else None,
                   scipy=all(hasattr(p, "tocsr") for p in parts))


def index_dtype_for(nnz: int):
    """int32 row pointers where the non-zeros allow: scipy keeps int32 column indices as they are
    only when the row pointers are int32 too (else it copies both to int64)."""
    return np.int32 if nnz < np.iinfo(np.int32).max else np.int64


def csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_columns: int | None, scipy: bool = True):
    """A CSR over the given arrays without copying them (a scipy matrix where asked and possible)."""
    if scipy and n_columns is not None:
        from scipy import sparse  # the sources that hand out scipy blocks have it installed

        # set on an empty matrix rather than passed to the constructor: scipy copies arrays that are
        # views of one over twice their size (a short window in a grown buffer), which is what a
        # buffer hands out
        matrix = sparse.csr_matrix((len(indptr) - 1, n_columns), dtype=data.dtype)
        matrix.data, matrix.indices, matrix.indptr = data, indices, indptr
        return matrix
    return RowBlock(data, indices, indptr)


class RowBlock:
    """Rows as (data, indices, indptr): all that the loader's row scatter reads."""

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray):
        self.data, self.indices, self.indptr = data, indices, indptr
