"""What mapping and prediction hand back to users: AnnData tables built from representations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.infer.labels import transfer_labels
from atlasdgd.runtime.device import on_device_of, to_numpy

EMBEDDING_KEY = "X_dgd"
CLUSTER_KEY = "dgd_cluster"


def mapped_cells_table(module, vocab, obs: pd.DataFrame, mapping) -> ad.AnnData:
    """The query's obs plus dgd_cluster, dgd_label(+confidence), dgd_<covariate>, dgd_nll_per_feature;
    obsm X_dgd and X_dgd_<covariate>."""
    obs = obs.copy()
    z = on_device_of(module, mapping.values)
    with torch.no_grad():
        basal, covs = module.split_representation(z)
        obs[CLUSTER_KEY] = pd.Categorical(to_numpy(module.basal.cluster(basal)), categories=range(module.config.n_components))
        if any(lab is not None for lab in vocab.component_labels):
            labels, confidence = transfer_labels(to_numpy(module.basal.posterior(basal)), vocab.component_labels)
            obs["dgd_label"] = pd.Categorical(labels)
            obs["dgd_label_confidence"] = confidence
        for key, gmm in module.covariate_gmms.items():
            # the class each cell's covariate block sits closest to (its own where it was known)
            names = np.asarray(vocab.covariates[key], dtype=object)
            obs[f"dgd_{key}"] = pd.Categorical(names[to_numpy(gmm.cluster(covs[key]))], categories=list(names))
    obs["dgd_nll_per_feature"] = mapping.recon_per_feature
    obsm = {EMBEDDING_KEY: to_numpy(basal).copy()}
    obsm.update({f"{EMBEDDING_KEY}_{k}": to_numpy(v).copy() for k, v in covs.items()})
    return ad.AnnData(obs=obs, obsm=obsm)


def append_cells(cells: ad.AnnData, table: ad.AnnData, vocab, n_components: int) -> ad.AnnData:
    """The atlas's cell table with mapped cells appended (split ``mapped``; label = the query's own
    label column if it has one, else the transferred label; covariates = the query's, else inferred)."""
    obs = pd.DataFrame(index=table.obs.index)
    for col in cells.obs.columns:
        if col == SPLIT_KEY:
            obs[col] = "mapped"
        elif col == vocab.label_key:
            source = col if col in table.obs else "dgd_label" if "dgd_label" in table.obs else None
            obs[col] = table.obs[source].astype(object).to_numpy() if source else None
        elif col in table.obs:
            obs[col] = table.obs[col].astype(object).to_numpy()
        elif col in vocab.covariates and f"dgd_{col}" in table.obs:
            obs[col] = table.obs[f"dgd_{col}"].astype(object).to_numpy()
    both = pd.concat([cells.obs.astype(object), obs.astype(object)])
    for col in both.columns:
        if col == CLUSTER_KEY:
            both[col] = pd.Categorical(both[col].astype(int), categories=range(n_components))
        else:
            both[col] = pd.Categorical(both[col].where(both[col].notna(), None))
    obsm = {k: np.concatenate([cells.obsm[k], table.obsm[k]]) for k in cells.obsm}
    return ad.AnnData(obs=both, obsm=obsm)


def predicted_modalities(module, vocab, library_model, aligned, values: np.ndarray, table: ad.AnnData) -> dict[str, ad.AnnData]:
    """One AnnData per model modality: X fractions, layer dgd_mean, var dgd_dispersion, obs
    dgd_library(+_source) and the mapping's obs/obsm (see :mod:`atlasdgd.infer.library`)."""
    measured = {m: aligned.library(m) for m in aligned.modalities}
    with torch.no_grad():
        log_y = module.log_fractions(on_device_of(module, values))
    out = {}
    for m, features in vocab.features.items():
        y = to_numpy(torch.exp(log_y[m]))
        observed = aligned.observed[m]
        library, source = library_model.predict(m, measured, aligned.observed)
        if m in measured:
            # a measured library covers only the measured features: scale it to all of them
            covered = y[:, aligned.features[m]].sum(axis=1)
            library = np.where(observed, measured[m] / np.maximum(covered, 1e-12), library).astype(np.float32)
            source = np.where(observed, "measured", source)
        obs = table.obs.copy()
        obs["dgd_library"] = library
        obs["dgd_library_source"] = pd.Categorical(source)
        var = pd.DataFrame(index=pd.Index(features))
        var["dgd_dispersion"] = to_numpy(module.dispersion(m))
        out[m] = ad.AnnData(X=y.astype(np.float32), obs=obs, var=var, obsm=dict(table.obsm),
                            layers={"dgd_mean": (y * library[:, None]).astype(np.float32)})
    return out


def training_cells_table(module, obs: pd.DataFrame, values: np.ndarray) -> ad.AnnData:
    """The model's cell table: obs plus dgd_cluster; obsm X_dgd and X_dgd_<covariate>."""
    obs = obs.copy()
    z = on_device_of(module, values)
    with torch.no_grad():
        obs[CLUSTER_KEY] = pd.Categorical(to_numpy(module.cluster(z)), categories=range(module.config.n_components))
    basal, covs = module.split_representation(z)
    obsm = {EMBEDDING_KEY: to_numpy(basal).copy()}
    obsm.update({f"{EMBEDDING_KEY}_{k}": to_numpy(v).copy() for k, v in covs.items()})
    return ad.AnnData(obs=obs, obsm=obsm)


def component_labels(cells: ad.AnnData, label_key: str | None, n_components: int) -> list[str | None]:
    """Majority training-cell label of each mixture component (None where it has no labelled cell)."""
    if not label_key:
        return []
    obs = cells.obs
    train = obs[(obs[SPLIT_KEY] == "train") & obs[label_key].notna()]
    out: list[str | None] = []
    for k in range(n_components):
        labels = train.loc[train[CLUSTER_KEY] == k, label_key]
        out.append(str(labels.value_counts().idxmax()) if len(labels) else None)
    return out
