"""`atlasdgd evaluate`: the metrics the DGD publications report, for a model and a data set.

Cells the model was trained on (matched by cell name) keep their stored representations; other
cells are mapped. Clustering metrics use every cell; reconstruction metrics use held-out cells
only: the model's test split plus every mapped cell. With ``predict_modalities`` the held-out cells
are mapped a second time without those modalities, which are then predicted (library size from the
model's library model) and scored against the measured counts.
"""

from __future__ import annotations

import copy

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.errors import AtlasDGDError
from atlasdgd.evaluate.metrics import batch_mixing
from atlasdgd.evaluate.reconstruction import reconstruction_metrics
from atlasdgd.infer.mapping import map_cells
from atlasdgd.infer.query import Query

ATAC_LIKE = ("atac", "peak", "chromatin", "accessibility")


def _without(query: Query, modalities: list[str], rows: np.ndarray) -> Query:
    """The query's ``rows`` with ``modalities`` hidden."""
    q = copy.copy(query)
    q.obs = query.obs.iloc[rows]
    q.counts = {m: x[rows] for m, x in query.counts.items() if m not in modalities}
    q.observed = {m: (np.zeros(len(rows), bool) if m in modalities else o[rows]) for m, o in query.observed.items()}
    q.covariates = query.covariates[rows]
    return q


def evaluate(model, data, label_key: str | None = None, batch_key: str | None = None,
             predict_modalities: list[str] | tuple[str, ...] = (), auprc_modalities: list[str] | None = None,
             map_all: bool = False, epochs: int = 20, progress: bool = False, **align_options) -> dict:
    """Metrics of ``model`` on ``data`` (AnnData/MuData with raw counts) as a JSON-ready dict."""
    obs_cols = list(data.obs.columns)
    for key, role in ((label_key, "label"), (batch_key, "batch")):
        if key is not None and key not in obs_cols:
            raise AtlasDGDError(f"{role} key {key!r} is not a column of the data's obs (columns: {obs_cols[:20]})")
    unknown = [m for m in predict_modalities if m not in model.vocab.features]
    if unknown:
        raise AtlasDGDError(f"cannot predict {unknown}: the model's modalities are {list(model.vocab.features)}")
    if predict_modalities and model.library_model is None:
        raise AtlasDGDError("this model has no library-size statistics (saved by an older atlasdgd): retrain it to predict modalities")
    aligned = model.align(data, **align_options)
    missing = [m for m in predict_modalities if m not in aligned.counts]
    if missing:
        raise AtlasDGDError(f"the data has no measured {missing} to compare predictions with")
    n = aligned.n_cells
    cells = model.cells
    pos = cells.obs.index.get_indexer(aligned.obs.index) if not map_all else np.full(n, -1)
    known = pos >= 0
    values = np.zeros((n, model.model_config.representation_dim), dtype=np.float32)
    values[known] = model.representation[pos[known]]
    to_map = np.flatnonzero(~known)
    options = model.mapping_options(epochs=epochs)
    if len(to_map):
        values[to_map] = map_cells(model.module, aligned, options, rows=to_map, progress=progress).values
    split = np.where(known, cells.obs[SPLIT_KEY].astype(str).to_numpy()[np.maximum(pos, 0)], "mapped")
    heldout = np.flatnonzero((split == "test") | (split == "mapped"))

    import torch

    from atlasdgd.runtime.device import on_device_of, to_numpy

    basal = values[:, : model.model_config.latent_dim]
    with torch.no_grad():
        clusters = to_numpy(model.module.basal.cluster(on_device_of(model.module, basal)))
    out: dict = {"cells": int(n), "cells_mapped": int(len(to_map)), "cells_heldout": int(len(heldout)),
                 "components_used": int(len(np.unique(clusters)))}
    if label_key is not None:
        labels = data.obs[label_key].astype(str).to_numpy()
        has = data.obs[label_key].notna().to_numpy()
        out["ari"] = float(adjusted_rand_score(labels[has], clusters[has]))
        out["nmi"] = float(normalized_mutual_info_score(labels[has], clusters[has]))
        if has.sum() > 2 and len(np.unique(labels[has])) > 1:
            out["label_silhouette"] = float(silhouette_score(basal[has], labels[has], sample_size=min(int(has.sum()), 10_000),
                                                             random_state=0))
    if batch_key is not None:
        batches = data.obs[batch_key].astype(str).to_numpy()
        out["batch_mixing"] = batch_mixing(basal, batches, None if label_key is None else data.obs[label_key].astype(str).to_numpy())
    auprc = tuple(auprc_modalities) if auprc_modalities is not None else tuple(
        m for m in model.vocab.features if any(a in m.lower() for a in ATAC_LIKE))
    if len(heldout):
        counts = {m: x[heldout] for m, x in aligned.counts.items()}
        out["heldout"] = reconstruction_metrics(model.module, counts, values[heldout], features=aligned.features,
                                                auprc_modalities=auprc)
    if predict_modalities and len(heldout):
        partial = _without(aligned, list(predict_modalities), heldout)
        mapped = map_cells(model.module, partial, options, progress=progress)
        measured = {m: partial.library(m) for m in partial.counts}
        libraries = {m: model.library_model.predict(m, measured, partial.observed)[0] for m in predict_modalities}
        counts = {m: aligned.counts[m][heldout] for m in predict_modalities}
        out["predicted"] = {
            "from": sorted(partial.counts),
            **reconstruction_metrics(model.module, counts, mapped.values, libraries=libraries, features=aligned.features,
                                     auprc_modalities=auprc),
        }
    return out
