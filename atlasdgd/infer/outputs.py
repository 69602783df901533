"""What mapping and prediction hand back to users: AnnData tables built from representations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.infer.labels import LabelTransfer, transfer_labels
from atlasdgd.runtime.device import on_device_of, to_numpy

EMBEDDING_KEY = "X_dgd"
CLUSTER_KEY = "dgd_cluster"
LABEL_PROBABILITIES_KEY = "dgd_label_probabilities"


def mapped_cells_table(module, vocab, obs: pd.DataFrame, mapping, labeller: LabelTransfer | None = None,
                       unknown_below: float = 0.0) -> ad.AnnData:
    """The query's obs plus dgd_cluster, dgd_label(+confidence), dgd_<covariate>, dgd_nll_per_feature;
    obsm X_dgd, X_dgd_<covariate> and (with a ``labeller``) dgd_label_probabilities, one column per label."""
    obs = obs.copy()
    z = on_device_of(module, mapping.values)
    label_probs = None
    with torch.no_grad():
        basal, covs = module.split_representation(z)
        obs[CLUSTER_KEY] = pd.Categorical(to_numpy(module.basal.cluster(basal)), categories=range(module.config.n_components))
        if labeller is not None:
            labels, confidence, probs = labeller.predict(to_numpy(basal), to_numpy(module.basal.posterior(basal)),
                                                         unknown_below)
            obs["dgd_label"] = pd.Categorical(labels)
            obs["dgd_label_confidence"] = confidence
            label_probs = pd.DataFrame(probs.astype(np.float32), index=obs.index, columns=labeller.columns)
        elif any(lab is not None for lab in vocab.component_labels):
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
    if label_probs is not None:
        obsm[LABEL_PROBABILITIES_KEY] = label_probs
    return ad.AnnData(obs=obs, obsm=obsm)


def label_transfer(module, vocab, cells: ad.AnnData, seed: int = 0) -> LabelTransfer | None:
    """The model's label transfer: its labelled training cells as neighbours, the fitted settings
    from ``vocab.label_transfer`` (posterior only for models saved before calibration existed)."""
    if not vocab.label_key or not any(lab is not None for lab in vocab.component_labels):
        return None
    train = (cells.obs[SPLIT_KEY] == "train").to_numpy() & cells.obs[vocab.label_key].notna().to_numpy()
    if not train.any():
        return None
    params = {k: v for k, v in vocab.label_transfer.items() if k in ("weight", "temperature", "k", "atypical_tail", "shift_corrected")}
    return LabelTransfer.from_cells(cells.obsm[EMBEDDING_KEY], cells.obs[vocab.label_key].to_numpy(), list(vocab.labels),
                                    vocab.component_labels, seed=seed, rows=np.flatnonzero(train), **params)


def fit_label_transfer(module, vocab, cells: ad.AnnData, seed: int = 0) -> dict:
    """Fit the label transfer's weight and temperature on the validation cells; returns the settings
    and what was measured, for ``vocab.label_transfer``."""
    labeller = label_transfer(module, vocab, cells, seed)
    if labeller is None:
        return {}
    val = (cells.obs[SPLIT_KEY] == "validation").to_numpy() & cells.obs[vocab.label_key].notna().to_numpy()
    basal = cells.obsm[EMBEDDING_KEY][val]
    with torch.no_grad():
        posterior = to_numpy(module.basal.posterior(on_device_of(module, basal)))
    report = labeller.calibrate(basal, posterior, cells.obs[vocab.label_key].to_numpy()[val])
    return {**labeller.to_dict(), "fit": report}


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
    """The model's cell table: obs plus dgd_cluster; obsm X_dgd and X_dgd_<covariate>.

    On the CPU the obsm arrays are column views of ``values`` ``[cells, D]``, which they keep alive
    instead of copying it: copies were +100 MB at the end of a 1M-cell run, the peak of its last
    phase (measured). From an accelerator each comes back as an array of its own."""
    obs = obs.copy()
    z = on_device_of(module, values)
    with torch.no_grad():
        obs[CLUSTER_KEY] = pd.Categorical(to_numpy(module.cluster(z)), categories=range(module.config.n_components))
    basal, covs = module.split_representation(z)
    obsm = {EMBEDDING_KEY: to_numpy(basal)}
    obsm.update({f"{EMBEDDING_KEY}_{k}": to_numpy(v) for k, v in covs.items()})
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
