"""Metrics of clustering and batch mixing (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_samples

from atlasdgd.train.leiden import leiden_clusters  # noqa: F401  (the mixture start uses it too)


def batch_mixing(z: np.ndarray, batch: np.ndarray, labels: np.ndarray | None = None, max_cells: int = 20_000, seed: int = 0) -> float:
    """Batch removal score: mean of 1 - |silhouette of batch labels| (scIB's batch ASW).

    Within each cell-type label when ``labels`` are given (so biology is not counted as batch);
    1 means batches are perfectly mixed, 0 that they are separated.
    """
    rng = np.random.default_rng(seed)
    idx = np.arange(len(z)) if len(z) <= max_cells else rng.choice(len(z), max_cells, replace=False)
    z, batch = z[idx], np.asarray(batch)[idx]
    groups = np.zeros(len(z)) if labels is None else np.asarray(labels)[idx]
    scores = []
    for g in np.unique(groups):
        sel = groups == g
        if sel.sum() < 3 or len(np.unique(batch[sel])) < 2:
            continue
        s = silhouette_samples(z[sel], batch[sel])
        scores.append(np.mean(1 - np.abs(s)))
    return float(np.mean(scores)) if scores else float("nan")


def log_normalised_pca(x, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of log1p(counts scaled to the median library size): the standard baseline embedding."""
    from scipy import sparse

    lib = np.asarray(x.sum(axis=1)).ravel()
    y = sparse.csr_matrix(sparse.diags(np.median(lib) / np.maximum(lib, 1)) @ x)
    y.data = np.log1p(y.data)
    k = min(n_components, min(y.shape) - 1)
    return PCA(n_components=k, random_state=seed).fit_transform(y.toarray() if y.shape[1] <= 5000 else y)


def kmeans_clusters(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)




def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the cell-weighted mean |accuracy - confidence| over equal-width confidence bins.

    Written out (a few lines) because scikit-learn has calibration curves but no ECE.
    """
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total / max(1, len(confidence)))


def confidence_report(labels: np.ndarray, truth: np.ndarray, confidence: np.ndarray) -> dict:
    """Accuracy, ECE, AUROC of the confidence for right vs wrong labels, mean confidence on wrong ones."""
    from sklearn.metrics import roc_auc_score

    correct = np.asarray(labels, dtype=object).astype(str) == np.asarray(truth, dtype=object).astype(str)
    out = {"accuracy": float(correct.mean()), "ece": expected_calibration_error(confidence, correct),
           "mean_confidence_right": float(confidence[correct].mean()) if correct.any() else None,
           "mean_confidence_wrong": float(confidence[~correct].mean()) if (~correct).any() else None}
    out["auroc_confidence"] = float(roc_auc_score(correct, confidence)) if 0 < correct.sum() < len(correct) else None
    return out
