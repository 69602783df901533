"""Reconstruction metrics of held-out counts: RMSE, NB NLL per feature, AUPRC of binarised counts.

The predicted mean of a cell's counts is mu = s * y with the cell's measured library s (or the
library model's prediction for a modality the cell was not given, see
:mod:`atlasdgd.infer.library`). AUPRC scores each entry by the model's probability of a non-zero
count, 1 - NB(0 | mu, r), against x > 0 (scikit-learn's average precision).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from atlasdgd.runtime.device import on_device_of, to_numpy
from atlasdgd.model.module import DGDModule
from atlasdgd.model.nb import nb_log_prob

AUPRC_MAX_ENTRIES = 50_000_000  # cells x features kept for average precision (sorted in memory)


@torch.no_grad()
def reconstruction_metrics(
    module: DGDModule,
    counts: dict[str, "np.ndarray"],
    values: np.ndarray,
    libraries: dict[str, np.ndarray] | None = None,
    features: dict[str, np.ndarray] | None = None,
    auprc_modalities: tuple[str, ...] = (),
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per modality: ``rmse``, ``nb_nll_per_feature`` and (for ``auprc_modalities``) ``auprc`` plus
    the positive rate (the AUPRC of a random score).

    Args:
        counts: modality -> CSR counts ``[N, F_m]``.
        values: ``[N, D]`` representations of the same cells.
        libraries: modality -> library per cell (default: the row sums of ``counts``).
        features: modality -> model feature indices of ``counts``' columns when the cells were measured
            on only some features (the fractions are renormalised over those); default all.
    """
    z_all = on_device_of(module, values)
    device = z_all.device
    n = z_all.shape[0]
    rng = np.random.default_rng(seed)
    out = {}
    for m, x in counts.items():
        lib = np.asarray(x.sum(axis=1)).ravel() if libraries is None or m not in libraries else libraries[m]
        r = module.dispersion(m)
        if features is not None and m in features:
            r = r[torch.as_tensor(features[m], device=device)]
        sq, nll = 0.0, 0.0
        f = x.shape[1]
        keep_cells = n if m not in auprc_modalities else min(n, max(1, AUPRC_MAX_ENTRIES // f))
        auprc_rows = set(rng.choice(n, keep_cells, replace=False).tolist()) if keep_cells < n else None
        scores, truth = [], []
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            xb = torch.from_numpy(x[rows].toarray().astype(np.float32)).to(device)
            log_y = module.log_fractions(z_all[rows], [m])[m]
            if features is not None and m in features and len(features[m]) != log_y.shape[1]:
                log_y = log_y[:, torch.as_tensor(features[m], device=device)]
                log_y = log_y - torch.logsumexp(log_y, dim=1, keepdim=True)
            y = torch.exp(log_y)
            mu = y * torch.from_numpy(np.asarray(lib[rows], dtype=np.float32)).to(device)[:, None]
            sq += float(((xb - mu) ** 2).sum())
            nll -= float(nb_log_prob(xb, mu, r).sum())
            if m in auprc_modalities:
                sel = rows if auprc_rows is None else np.array([i for i in rows if i in auprc_rows], dtype=int)
                if len(sel):
                    local = torch.from_numpy(sel - start).to(device)
                    p_zero = torch.exp(nb_log_prob(torch.zeros(1, device=device), mu[local], r))
                    scores.append(to_numpy(1 - p_zero).ravel())
                    truth.append(to_numpy(xb[local] > 0).ravel())
        entries = n * f
        out[m] = {"rmse": float(np.sqrt(sq / entries)), "nb_nll_per_feature": nll / entries, "cells": int(n)}
        if m in auprc_modalities:
            t = np.concatenate(truth)
            out[m]["auprc"] = float(average_precision_score(t, np.concatenate(scores))) if t.any() else float("nan")
            out[m]["positive_rate"] = float(t.mean())
    return out
