import numpy as np
import pytest
from scipy.spatial.distance import cdist

from atlasdgd.infer import neighbours
from atlasdgd.infer.neighbours import Neighbours


def _exact(reference, points, k):
    d = cdist(points.astype(np.float64), reference.astype(np.float64))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_neighbours_equal_scipys_exact_distances_in_blocks(monkeypatch, offset):
    # small blocks (several per query set) and a cloud far from the origin, where the matrix-product
    # expansion in float32 would lose the neighbour distances without centring
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", 4 * 300 * 7)  # 7 query rows per block
    rng = np.random.default_rng(0)
    reference = (rng.normal(size=(300, 20)) + offset).astype(np.float32)
    points = (rng.normal(size=(50, 20)) + offset).astype(np.float32)
    index = Neighbours(reference)
    for k in (1, 15, 300):
        got_d, got_i = index.query(points, k)
        want_d, want_i = _exact(reference, points, k)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-12, atol=0)
        assert got_d.dtype == np.float64 and got_i.dtype == np.int64


def test_equal_distances_put_the_lower_index_first_and_a_point_finds_itself():
    reference = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    d, i = Neighbours(reference).query(np.array([[0.0, 0.0]]), 4)
    np.testing.assert_array_equal(i, [[1, 0, 2, 3]])  # itself at 0, then three at distance 1 by index
    np.testing.assert_allclose(d, [[0.0, 1.0, 1.0, 1.0]])


def test_bad_queries_are_refused_with_what_is_wrong():
    index = Neighbours(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="k must be between 1 and the 3 reference points"):
        index.query(np.zeros((1, 2)), 4)
    with pytest.raises(ValueError, match=r"query points must be \[points, 2\]"):
        index.query(np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="non-empty"):
        Neighbours(np.zeros((0, 2)))
