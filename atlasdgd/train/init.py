"""Initial representations and mixture means.

The reference starts every representation at zero. With one representation step per cell per
epoch (Adam moves a row by about one learning rate per step) the cells need hundreds of epochs
to spread out, and the mixture collapses meanwhile. Starting from a batch-centred PCA of the
log-normalised counts puts cells near where they belong from the first epoch; mixture means then
start from k-means on those positions.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import LinearOperator, svds
from sklearn.cluster import KMeans


def _log_normalise(x: sparse.csr_matrix, fit_rows: np.ndarray) -> sparse.csr_matrix:
    """log1p of counts scaled to the median library size of the ``fit_rows`` cells."""
    lib = np.asarray(x.sum(axis=1)).ravel()
    fit_lib = lib[fit_rows]
    target = float(np.median(fit_lib[fit_lib > 0])) if (fit_lib > 0).any() else 1.0
    scale = np.divide(target, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    y = sparse.csr_matrix(sparse.diags(scale) @ x, dtype=np.float64)
    y.data = np.log1p(y.data)
    return y


def _column_moments(y: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(y.mean(axis=0)).ravel()
    sq = np.asarray(y.multiply(y).mean(axis=0)).ravel()
    return mean, np.maximum(sq - mean**2, 0.0)


def pca_representations(
    counts: dict[str, sparse.csr_matrix],
    groups: np.ndarray,
    dim: int,
    radius: float,
    seed: int = 0,
    fit_mask: np.ndarray | None = None,
    max_fit_cells: int = 20_000,
) -> np.ndarray:
    """``[N, dim]`` initial representations from PCA of log-normalised counts.

    Each modality is log-normalised and weighted so that all modalities carry equal total variance;
    each batch group (the joint covariate classes) is centred separately so batch offsets do not
    become principal axes; the PCA and the centring are fitted on at most ``max_fit_cells`` cells
    (of those in ``fit_mask``: training cells, so held-out cells do not shape it) and every cell is
    projected. Scores are scaled by one factor so the mean norm is radius / 2.
    """
    rng = np.random.default_rng(seed)
    n = next(iter(counts.values())).shape[0]
    fit_pool = np.arange(n) if fit_mask is None else np.flatnonzero(fit_mask)
    blocks = []
    for x in counts.values():
        y = _log_normalise(x, fit_pool)
        _, var = _column_moments(y[fit_pool])
        total = var.sum()
        blocks.append(y * (1.0 / np.sqrt(total)) if total > 0 else y)
    y = sparse.hstack(blocks, format="csr")
    f = y.shape[1]
    _, group_codes = np.unique(groups, return_inverse=True)
    n_groups = group_codes.max() + 1
    onehot = sparse.csr_matrix((np.ones(n), (np.arange(n), group_codes)), shape=(n, n_groups))
    fit_onehot = onehot[fit_pool]
    counts_per_group = np.maximum(np.asarray(fit_onehot.sum(axis=0)).ravel(), 1)
    group_means = np.asarray((fit_onehot.T @ y[fit_pool]).todense()) / counts_per_group[:, None]

    fit_rows = np.sort(rng.choice(fit_pool, size=min(len(fit_pool), max_fit_cells), replace=False))
    k = min(dim, min(len(fit_rows), f) - 1)
    if k < 1:
        return np.zeros((n, dim), dtype=np.float32)
    v = centred_components(y[fit_rows], group_codes[fit_rows], group_means, k, seed)
    scores = y @ v - (group_means @ v)[group_codes]
    z = np.zeros((n, dim))
    z[:, :k] = scores
    return scale_to_radius(z, fit_pool, radius)


def centred_components(yf: sparse.csr_matrix, gf: np.ndarray, group_means: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Top ``k`` right singular vectors ``[F, k]`` of ``yf`` with each row's group mean subtracted,
    without densifying (a LinearOperator for svds)."""
    rng = np.random.default_rng(seed)
    n_groups = group_means.shape[0]
    op = LinearOperator(
        yf.shape,
        matvec=lambda v: yf @ v - group_means[gf] @ v,
        rmatvec=lambda u: yf.T @ u - group_means.T @ np.bincount(gf, weights=u, minlength=n_groups),
        matmat=lambda v: yf @ v - group_means[gf] @ v,
        rmatmat=lambda u: yf.T @ u - group_means.T @ (sparse.csr_matrix(
            (np.ones(len(gf)), (gf, np.arange(len(gf)))), shape=(n_groups, len(gf))) @ u),
        dtype=np.float64,
    )
    _, s, vt = svds(op, k=k, v0=rng.standard_normal(min(op.shape)), random_state=seed)
    return vt[np.argsort(s)[::-1]].T


def scale_to_radius(z: np.ndarray, fit_rows: np.ndarray, radius: float) -> np.ndarray:
    """One factor for all cells so the mean norm of the ``fit_rows`` cells is radius / 2."""
    mean_norm = np.linalg.norm(z[fit_rows], axis=1).mean()
    if mean_norm > 0:
        z *= 0.5 * radius / mean_norm  # in place: z is one value per cell and dimension
    return z.astype(np.float32, copy=False)


def mixture_start(
    z: np.ndarray, k: int, method: str = "kmeans", labels: np.ndarray | None = None, seed: int = 0,
    max_cells: int = 50_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means ``[k, L]``, variances ``[k, L]`` and weights ``[k]`` of a partition of start positions ``z``.

    The partition: ``kmeans``; ``labels`` (the k label classes: codes 0..k-1, -1 = unlabelled);
    ``leiden`` (a kNN-graph partition into k clusters, falling back to k-means when no resolution
    gives exactly k). All on a subsample of at most ``max_cells`` cells. Starting the variances from
    the partition (not at sigma0) lets the mixture's assignment reproduce the partition; starting at
    sigma0 re-assigns border cells and training then consolidates the wrong partition (Kang PBMC,
    label start: ARI 0.97 with fitted variances, 0.85 with sigma0).
    """
    rng = np.random.default_rng(seed)
    idx = np.arange(len(z)) if len(z) <= max_cells else np.sort(rng.choice(len(z), max_cells, replace=False))
    sub = z[idx]
    if len(sub) < k:
        raise ValueError(f"cannot start {k} mixture components from {len(sub)} cells")
    assign = None
    if method == "labels":
        if labels is None:
            raise ValueError("gmm_init='labels' needs a label key")
        assign = np.asarray(labels)[idx]
        if len(np.unique(assign[assign >= 0])) < k:
            raise ValueError(f"gmm_init='labels' needs cells of all {k} labels among the training cells")
    elif method == "leiden":
        from atlasdgd.evaluate.metrics import leiden_clusters

        assign = leiden_clusters(sub, k, seed)
        if assign.max() + 1 != k:
            assign = None
    elif method != "kmeans":
        raise ValueError(f"unknown mixture start {method!r}: use 'leiden', 'kmeans' or 'labels'")
    if assign is None:
        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(sub)
    means = np.stack([sub[assign == c].mean(0) for c in range(k)]).astype(np.float32)
    variances = np.stack([sub[assign == c].var(0) if (assign == c).sum() > 1 else np.ones(z.shape[1]) for c in range(k)])
    variances = np.maximum(variances, 1e-4).astype(np.float32)
    weights = np.bincount(assign[assign >= 0], minlength=k) / max(1, (assign >= 0).sum())
    return means, variances, weights.astype(np.float32)
