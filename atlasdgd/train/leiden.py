"""Leiden partitions of a point cloud with a given number of clusters (mixture start, evaluation)."""

from __future__ import annotations

import numpy as np


def leiden_clusters(x: np.ndarray, k: int, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Leiden on a symmetrised kNN graph of ``x``, resolution bisected to give ``k`` clusters.

    Built on scikit-learn + igraph + leidenalg directly (the scanpy path breaks on scipy 1.17).
    """
    import igraph as ig
    import leidenalg
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(np.asarray(x, dtype=np.float32), n_neighbors, mode="connectivity", include_self=False)
    graph = graph.maximum(graph.T).tocoo()
    keep = graph.row < graph.col
    g = ig.Graph(n=x.shape[0], edges=list(zip(graph.row[keep].tolist(), graph.col[keep].tolist())))
    lo, hi, best = 0.001, 5.0, None
    for _ in range(40):
        res = (lo + hi) / 2
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, resolution_parameter=res, seed=seed)
        best = np.asarray(part.membership)
        n = best.max() + 1
        if n == k:
            break
        lo, hi = (res, hi) if n < k else (lo, res)
    return best
