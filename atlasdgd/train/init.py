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
              max_fit_cells: int = 20_000, block_cells: int = 2048, out: np.ndarray | None = None) -> np.ndarray:
    """``[N, dim]`` float32 start positions from a batch-centred PCA of log-normalised counts, for any
    cell source (:class:`~atlasdgd.data.source.CellSource`): in memory, a store, SOMA.

    Each modality is log-normalised (to the median library of the ``fit_mask`` cells) and weighted so
    that all modalities carry equal total variance; each batch group (the joint covariate classes) is
    centred separately so batch offsets do not become principal axes. Weights, group means and the
    principal axes are fitted on at most ``max_fit_cells`` training cells (held-out cells do not
    shape them). Everything is read ``block_cells`` rows at a time: the fit sample is kept only as
    its normalised non-zeros in float32 (8 bytes each; it was the start's, and training's, peak:
    float64 copies plus a dense [cells x genes] centring term, +465 MiB for 16k cells, measured), and
    every cell is then projected block by block, so memory is the sample plus ``N x dim`` scores
    (written into ``out`` when given: a float32 ``[N, dim]`` array or view, e.g. the first columns of
    the representation table's start). Scores are scaled by one factor so the mean norm is radius / 2.
    """
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
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1
    blocks = [fit[i:i + block_cells] for i in range(0, len(fit), block_cells)]

    # pass 1 over the fit sample: its normalised values (unweighted) with per-feature and per-group sums
    sample = {m: [] for m in modalities}
    sums = {m: np.zeros(source.n_features(m)) for m in modalities}
    squares = {m: np.zeros(source.n_features(m)) for m in modalities}
    group_sums = {m: np.zeros((n_groups, source.n_features(m))) for m in modalities}
    for cells in blocks:
        for m in modalities:
            y = _log_normalised(_read_csr(source, m, cells), libraries[m][cells], targets[m])
            sums[m] += np.bincount(y.indices, weights=y.data, minlength=y.shape[1])
            squares[m] += np.bincount(y.indices, weights=y.data * y.data, minlength=y.shape[1])
            group_sums[m] += (_group_indicator(codes[cells], n_groups) @ y).toarray()
            sample[m].append(y.astype(np.float32))
    weights = {}
    for m in modalities:
        mean, mean_sq = sums[m] / len(fit), squares[m] / len(fit)
        total = float(np.maximum(mean_sq - mean**2, 0).sum())
        weights[m] = 1.0 / np.sqrt(total) if total > 0 else 1.0
    for m in modalities:
        for y in sample[m]:
            y.data *= np.float32(weights[m])
    yf = [_hstack([sample[m][b] for m in modalities]) for b in range(len(blocks))]
    del sample
    counts_per_group = np.maximum(np.bincount(codes[fit], minlength=n_groups), 1)[:, None]
    group_means = np.hstack([group_sums[m] * weights[m] for m in modalities]) / counts_per_group
    n_features = group_means.shape[1]
    k = min(dim, min(len(fit), n_features) - 1)
    z = np.zeros((n, dim), dtype=np.float32) if out is None else out  # float32: N x dim for every cell
    z[:] = 0
    if k < 1:
        return z
    v = centred_components(yf, codes[fit], group_means, k, seed)
    del yf
    shift = group_means @ v
    for first in range(0, n, block_cells):
        cells = np.arange(first, min(n, first + block_cells))
        y = _hstack([_log_normalised(_read_csr(source, m, cells), libraries[m][cells], targets[m], weights[m])
                     for m in modalities])
        z[cells, :k] = y @ v - shift[codes[cells]]
    return scale_to_radius(z, pool, radius)


def _read_csr(source, modality: str, rows: np.ndarray):
    """Rows as a scipy CSR matrix, whatever CSR-like object the source returns."""
    from scipy import sparse

    x = source.read_rows(modality, rows)
    if sparse.issparse(x):
        return sparse.csr_matrix(x)
    return sparse.csr_matrix((x.data, x.indices, x.indptr), shape=(len(x.indptr) - 1, source.n_features(modality)))


def _log_normalised(x, library: np.ndarray, target: float, weight: float = 1.0):
    """``weight * log1p(x * target / library)`` of CSR counts as float64 CSR, cells of library 0 all zero.
    One float64 copy of the values, scaled and logged in place, indices shared with ``x``."""
    from scipy import sparse

    lib = library.astype(np.float64)
    scale = np.divide(target, lib, out=np.zeros_like(lib), where=lib > 0)
    lo, hi = int(x.indptr[0]), int(x.indptr[-1])
    data = x.data[lo:hi].astype(np.float64)
    data *= np.repeat(scale, np.diff(x.indptr))
    np.log1p(data, out=data)
    if weight != 1.0:
        data *= weight
    return sparse.csr_matrix((data, x.indices[lo:hi], x.indptr - lo), shape=x.shape)


def _hstack(parts: list):
    from scipy import sparse

    return parts[0] if len(parts) == 1 else sparse.hstack(parts, format="csr")


def _group_indicator(codes: np.ndarray, n_groups: int):
    """``[n_groups, cells]`` sparse 0/1 matrix: row g sums the cells of group g."""
    from scipy import sparse

    return sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_groups, len(codes)))


def centred_components(blocks: list, codes: np.ndarray, group_means: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Top ``k`` right singular vectors ``[F, k]`` of the CSR row ``blocks`` stacked, with each row's
    group mean subtracted, without densifying or stacking (a LinearOperator for svds).

    The centring is applied to the products, ``(group_means @ v)[codes]``: forming ``group_means[codes]``
    would be a dense [cells x features] copy per product. The vectors' signs are ARPACK's (arbitrary).
    Fixing them (largest loading positive, as scikit-learn's ``svd_flip``) mirrored some axes of the
    start, and ``tests/test_ray.py``'s 12-epoch comparison of two Ray workers with one process then
    moved from within its 2% bar to 2.5%: that comparison is sensitive to the start's orientation.
    """
    from scipy.sparse.linalg import LinearOperator, svds

    rng = np.random.default_rng(seed)
    n_groups = group_means.shape[0]
    n_cells = sum(b.shape[0] for b in blocks)
    bounds = np.cumsum([0] + [b.shape[0] for b in blocks])

    def matmat(v):  # float32 blocks times float64 v: scipy computes in float64
        return np.concatenate([b @ v for b in blocks]) - (group_means @ v)[codes]

    def rmatmat(u):
        out = sum(b.T @ u[lo:hi] for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:]))
        return out - group_means.T @ (_group_indicator(codes, n_groups) @ u)

    op = LinearOperator((n_cells, group_means.shape[1]), matvec=matmat, rmatvec=rmatmat, matmat=matmat,
                        rmatmat=rmatmat, dtype=np.float64)
    # right vectors only: the left ones are a [cells, k] float64 product (160 MB at 1M cells) nobody reads
    _, s, vt = svds(op, k=k, v0=rng.standard_normal(min(op.shape)), random_state=seed, return_singular_vectors="vh")
    return vt[np.argsort(s)[::-1]].T


def scale_to_radius(z: np.ndarray, fit_rows: np.ndarray, radius: float) -> np.ndarray:
    """One factor for all cells so the mean norm of the ``fit_rows`` cells is radius / 2 (in place)."""
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
