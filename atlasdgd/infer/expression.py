"""Decoded expression and writing mapping results into the caller's AnnData/MuData (the scvi-tools
shaped calls on :class:`atlasdgd.DGD`: ``get_normalized_expression``, ``map(inplace=True)``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from atlasdgd.infer.outputs import CLUSTER_KEY, EMBEDDING_KEY, LABEL_PROBABILITIES_KEY
from atlasdgd.runtime.device import on_device_of, to_numpy

# what map(inplace=True) writes, and nothing else
INPLACE_OBS = (CLUSTER_KEY, "dgd_label", "dgd_label_confidence")


def inplace_obsm_keys(covariates) -> list[str]:
    return [EMBEDDING_KEY, *(f"{EMBEDDING_KEY}_{k}" for k in covariates), LABEL_PROBABILITIES_KEY]


def decoded_fractions(module, representation: np.ndarray, modality: str, features: np.ndarray | None = None,
                      block: int = 4096) -> np.ndarray:
    """``[cells, features]`` float32 expression fractions of ``modality`` decoded from full
    representations, block by block (the decoder's output is dense: one block at a time)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(representation), block):
            z = on_device_of(module, representation[start : start + block])
            y = torch.exp(module.log_fractions(z, [modality])[modality])
            if features is not None:
                y = y[:, torch.as_tensor(features, device=y.device)]
            out.append(to_numpy(y).astype(np.float32, copy=False))
    n = len(features) if features is not None else module.config.modalities[modality]
    return np.concatenate(out) if out else np.zeros((0, n), dtype=np.float32)


def write_into(target, table, covariates) -> None:
    """Copy the mapping results of ``table`` (from ``mapped_cells_table``) into ``target``'s obs and
    obsm (an AnnData, or a MuData's global obs/obsm), rows matched by position (the table keeps
    the query's cell order)."""
    if table.n_obs != target.n_obs or not np.array_equal(np.asarray(table.obs_names), np.asarray(target.obs_names)):
        raise ValueError("the mapped cells do not line up with the query's cells")  # a bug, not user input
    for key in INPLACE_OBS:
        if key in table.obs:
            target.obs[key] = table.obs[key].to_numpy() if key != CLUSTER_KEY else table.obs[key].values
    for key in inplace_obsm_keys(covariates):
        if key in table.obsm:
            value = table.obsm[key]
            target.obsm[key] = value.set_axis(target.obs_names) if isinstance(value, pd.DataFrame) else value
