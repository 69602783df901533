"""The loader's row copy into dense batches: scipy's own result, whichever way it is computed."""

import numpy as np
import pytest
from scipy import sparse

from atlasdgd.data import row_gather
from atlasdgd.data.row_gather import gather_dense


def _matrix(index_dtype, n_rows=300, n_columns=50, seed=0):
    x = sparse.random(n_rows, n_columns, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    x.data[:] = np.random.default_rng(seed).integers(1, 20, x.nnz)
    x.data[x.indptr[7] : x.indptr[8]] = 0  # an empty row
    x.eliminate_zeros()
    assert x.indptr[8] == x.indptr[7]
    x.indptr, x.indices = x.indptr.astype(index_dtype), x.indices.astype(index_dtype)
    return x


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_rows_are_copied_densely_as_scipy_indexes_them(index_dtype, public, monkeypatch):
    if public:  # the fallback where scipy's private kernels are missing
        monkeypatch.setattr(row_gather, "_kernels", lambda: None)
    x = _matrix(index_dtype)
    rng = np.random.default_rng(1)
    for rows in (np.sort(rng.choice(300, 64, replace=False)), np.arange(10, 40), np.array([7]), np.array([3, 3, 7, 0]),
                 np.array([], dtype=np.int64)):
        out = np.full((len(rows), 50), -1.0, dtype=np.float32)  # stale values must be overwritten
        indptr, indices, data = gather_dense(x, rows, out)
        want = x[rows]
        np.testing.assert_array_equal(out, want.toarray())
        np.testing.assert_array_equal(indptr, want.indptr)
        np.testing.assert_array_equal(indices, want.indices)
        np.testing.assert_array_equal(data, want.data)
        assert not np.shares_memory(data, x.data) and not np.shares_memory(indices, x.indices)


def test_mixed_index_dtypes_and_bad_arguments():
    x = _matrix(np.int32)
    x.indptr = x.indptr.astype(np.int64)  # as anndata can hand them: the public way, same result
    out = np.empty((3, 50), dtype=np.float32)
    gather_dense(x, np.array([0, 5, 299]), out)
    np.testing.assert_array_equal(out, x[[0, 5, 299]].toarray())
    with pytest.raises(IndexError, match="rows"):
        gather_dense(x, np.array([0, 300]), np.empty((2, 50), dtype=np.float32))
    with pytest.raises(IndexError, match="rows"):
        gather_dense(x, np.array([-1]), np.empty((1, 50), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        gather_dense(x, np.array([0, 1]), np.empty((3, 50), dtype=np.float32))
