"""Exact k nearest neighbours (Euclidean) of query points among reference points, in torch.

The label transfer used scikit-learn's ``NearestNeighbors``. Importing ``sklearn.neighbors`` costs a
training process 50-60 MiB of resident memory (scikit-learn and the scipy modules it pulls in), and in
200k-cell training runs that import, in the last phase (the label transfer's fit), set the run's peak
(RSS sampled by phase, issue 12). Torch is loaded already. A brute-force search is what scikit-learn
chose here too (20 dimensions: its trees were 40x slower, measured). The label transfer's fit on 50k
reference and 20k validation cells, alternating, 2 threads: 7.3-7.9 s and 29-34 MiB of peak growth
here, 8.2-10.4 s and 21 MiB plus the import with scikit-learn.

Each block of queries gets its squared distances to every reference point from one matrix product
(``|r|^2 - 2 q.r``, the query's own ``|q|^2`` left out: it does not change the order) in float32 on
points centred at the reference's mean, which keeps the expansion's rounding far below neighbour
distances; the k chosen then get their distances recomputed exactly in float64.
"""

from __future__ import annotations

import numpy as np
import torch

# bytes of one block's [queries, reference points] float32 distances
BLOCK_BYTES = 4 * 2**20


class Neighbours:
    """An index over ``reference`` (``[R, D]``) answering :meth:`query`."""

    def __init__(self, reference: np.ndarray):
        points = np.asarray(reference)
        if points.ndim != 2 or len(points) == 0:
            raise ValueError(f"reference points must be a non-empty [points, dimensions] array, got shape {points.shape}")
        # the caller's array itself where it is floating point (no copy: the label transfer's reference)
        self._points = points if points.dtype in (np.float32, np.float64) else points.astype(np.float64)
        self._mean = self._points.mean(axis=0, dtype=np.float64)
        self._centred = torch.from_numpy((self._points - self._mean).astype(np.float32))
        self._squared_norms = self._centred.pow(2).sum(1)

    def __len__(self) -> int:
        return len(self._points)

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, indices)``, both ``[len(points), k]``: each point's k nearest reference points,
        nearest first (equal distances: lower index first); distances float64, indices int64."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be between 1 and the {len(self)} reference points, got {k}")
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self._points.shape[1]:
            raise ValueError(f"query points must be [points, {self._points.shape[1]}], got shape {points.shape}")
        distances = np.empty((len(points), k))
        indices = np.empty((len(points), k), dtype=np.int64)
        rows = max(1, BLOCK_BYTES // (4 * len(self)))
        centred = torch.from_numpy((points - self._mean).astype(np.float32))
        # one buffer for every block's distances: a fresh one per block grew the process by ~300 MiB
        # over a search of 70k queries among 50k points (16 MiB blocks, measured)
        buffer = torch.empty((min(rows, len(points)), len(self)))
        for start in range(0, len(points), rows):
            block = centred[start : start + rows]
            partial = buffer[: len(block)]
            partial.copy_(self._squared_norms.expand(len(block), -1))
            partial.addmm_(block, self._centred.T, alpha=-2.0)
            chosen = torch.topk(partial, k, dim=1, largest=False, sorted=False).indices.numpy()
            exact = np.sqrt(((points[start : start + rows, None, :] - self._points[chosen].astype(np.float64)) ** 2).sum(-1))
            order = np.lexsort((chosen, exact), axis=1)
            distances[start : start + len(block)] = np.take_along_axis(exact, order, 1)
            indices[start : start + len(block)] = np.take_along_axis(chosen, order, 1)
        return distances, indices
