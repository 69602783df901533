"""AnnData / MuData in: turn user data into validated :class:`CellData`.

Three input shapes are accepted:
- AnnData with one modality (``X`` or a named layer), named ``rna`` unless told otherwise;
- AnnData whose ``var`` column (``modality_key``) names each feature's modality (10x multiome style);
- MuData with one modality per ``mod``; cells absent from a modality are marked unobserved there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data import validate
from atlasdgd.data.cells import SPLIT_KEY, CellData
from atlasdgd.data.split import as_split_categorical, split_from_column, stratified_split
from atlasdgd.errors import InputError

_KNOWN_FEATURE_TYPES = {"gene expression": "rna", "peaks": "atac", "antibody capture": "protein"}


def modality_name(feature_type: str) -> str:
    """A Python-identifier modality name for a var feature-type value ('Gene Expression' -> 'rna')."""
    key = str(feature_type).strip().lower()
    if key in _KNOWN_FEATURE_TYPES:
        return _KNOWN_FEATURE_TYPES[key]
    name = re.sub(r"\W+", "_", key).strip("_")
    return name if name and not name[0].isdigit() else f"m_{name}"


def read_input(path: str | Path) -> ad.AnnData | Any:
    """Open an .h5ad, .h5mu or AnnData .zarr file; a file that is not what its name says is an
    InputError naming the format expected, not a reader's traceback."""
    p = str(path)
    if p.endswith(".h5mu"):
        import mudata

        reader, kind = mudata.read_h5mu, "a MuData .h5mu (HDF5) file"
    elif p.endswith(".h5ad"):
        reader, kind = ad.read_h5ad, "an AnnData .h5ad (HDF5) file"
    elif p.rstrip("/").endswith(".zarr"):
        reader, kind = ad.read_zarr, "an AnnData .zarr store (or an atlasdgd store with its manifest)"
    else:
        raise InputError(f"cannot tell the format of {p!r}: use a file ending in .h5ad, .h5mu or .zarr")
    if not Path(p).exists():
        raise InputError(f"{p!r} does not exist")
    try:
        return reader(p)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"cannot read {p!r} as {kind} ({type(e).__name__}: {e}): check the file is complete and "
                         "of that format (write it with AnnData.write_h5ad / MuData.write / AnnData.write_zarr)") from e


def _as_csr(x: Any, name: str) -> sparse.csr_matrix:
    if x is None:
        raise InputError(f"modality {name!r} has no count matrix (X is None): pass a layer with counts")
    if sparse.issparse(x):
        m = sparse.csr_matrix(x, dtype=np.float32)
    else:
        m = sparse.csr_matrix(np.asarray(x, dtype=np.float32))
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def _matrix(adata: ad.AnnData, layer: str | None, name: str) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in modality {name!r} (layers: {list(adata.layers) or 'none'})")
    return adata.layers[layer]


def _modalities_from_anndata(adata, layer, modality_key, modality):
    x = _matrix(adata, layer if isinstance(layer, str) or layer is None else layer.get(modality), modality)
    if modality_key is None:
        return {modality: (_as_csr(x, modality), adata.var_names)}, None
    if modality_key not in adata.var.columns:
        raise InputError(f"modality key {modality_key!r} is not a column of var (columns: {list(adata.var.columns)})")
    x = _as_csr(x, modality)
    out = {}
    col = adata.var[modality_key].astype(str).to_numpy()
    for value in pd.unique(col):
        idx = np.flatnonzero(col == value)
        out[modality_name(value)] = (sparse.csr_matrix(x[:, idx]), adata.var_names[idx])
    return out, None


def _modalities_from_mudata(mdata, layer):
    out, observed = {}, {}
    n = mdata.n_obs
    for name, mod in mdata.mod.items():
        if not name.isidentifier():
            raise InputError(f"MuData modality {name!r} is not a valid name: rename it to letters, digits and _")
        x = _as_csr(_matrix(mod, layer if isinstance(layer, str) or layer is None else layer.get(name), name), name)
        pos = np.asarray(mdata.obsmap[name]).ravel().astype(np.int64)  # 1-based row in the modality, 0 = absent
        present = pos > 0
        if present.all() and np.array_equal(pos, np.arange(1, n + 1)):
            aligned = x
        else:
            rows = np.where(present, pos - 1, 0)
            aligned = sparse.csr_matrix(x[rows])
            aligned = sparse.diags(present.astype(np.float32)) @ aligned
            aligned = sparse.csr_matrix(aligned)
            aligned.eliminate_zeros()
        out[name] = (aligned, mod.var_names)
        observed[name] = present
    return out, observed


def read_modalities(data, layer=None, modality_key: str | None = None, modality: str = "rna"):
    """``({modality: (CSR counts, feature names)}, {modality: per-cell observed mask} or None)``."""
    is_mudata = hasattr(data, "mod") and hasattr(data, "obsmap")
    if not is_mudata and not isinstance(data, ad.AnnData):
        raise InputError(f"expected AnnData or MuData, got {type(data).__name__}")
    if data.n_obs == 0:
        raise InputError("the data has no cells: pass a non-empty AnnData/MuData")
    backed = [name for name, a in ([("the AnnData", data)] if not is_mudata else list(data.mod.items()))
              if getattr(a, "isbacked", False)]
    if backed:
        raise InputError(f"{', '.join(map(str, backed))} is opened backed (read_h5ad(..., backed='r')): load it into "
                         "memory (adata.to_memory()), or for data larger than memory ingest the file into an atlas "
                         "store (atlasdgd ingest) and train from that")
    if is_mudata:
        return _modalities_from_mudata(data, layer)
    if not modality.isidentifier():
        raise InputError(f"modality name {modality!r} must be letters, digits and _")
    return _modalities_from_anndata(data, layer, modality_key, modality)


def obs_column(obs: pd.DataFrame, key: str, role: str, modality_names: list[str]) -> pd.Series:
    if key in obs.columns:
        return obs[key]
    for m in modality_names:  # MuData keeps per-modality columns as "mod:key"
        if f"{m}:{key}" in obs.columns:
            return obs[f"{m}:{key}"]
    validate.check_obs_key(obs, key, role)
    raise AssertionError  # check_obs_key raised


def prepare(
    data,
    *,
    label_key: str | None = None,
    covariate_keys: list[str] | tuple[str, ...] = (),
    modalities: list[str] | None = None,
    layer: str | dict[str, str] | None = None,
    modality_key: str | None = None,
    modality: str = "rna",
    split_key: str | None = None,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> CellData:
    """Validate ``data`` (AnnData or MuData) and return it as :class:`CellData`.

    Everything is checked before any training work starts; problems raise
    :class:`~atlasdgd.errors.InputError` naming the fix.
    """
    mods, observed = read_modalities(data, layer, modality_key, modality)
    if modalities is not None:
        unknown = [m for m in modalities if m not in mods]
        if unknown:
            raise InputError(f"unknown modalities {unknown}: the data has {list(mods)}; pass some of those")
        mods = {m: mods[m] for m in modalities}
        observed = {m: observed[m] for m in modalities} if observed else None
    if not mods:
        raise InputError("no modality selected: pass at least one")

    counts, feature_names = {}, {}
    for name, (x, var_names) in mods.items():
        validate.check_counts(name, x)
        if pd.Index(var_names).duplicated().any():
            raise InputError(f"modality {name!r} has duplicate feature names: make them unique (adata.var_names_make_unique())")
        counts[name], feature_names[name] = x, pd.Index(var_names.astype(str))
    if observed is None:
        observed = {m: np.ones(data.n_obs, dtype=bool) for m in counts}

    obs_names = pd.Index(data.obs_names.astype(str))
    libraries = {m: np.asarray(x.sum(axis=1)).ravel() for m, x in counts.items()}
    validate.check_cells(obs_names, libraries)

    obs = pd.DataFrame(index=obs_names)
    names = list(counts)
    if label_key is not None:
        obs[label_key] = pd.Categorical(obs_column(data.obs, label_key, "label", names).to_numpy())
    for key in covariate_keys:
        col = obs_column(data.obs, key, "covariate", names)
        col = pd.Series(col.to_numpy(), index=obs_names)
        validate.check_covariate_values(col.to_frame(key), key)
        obs[key] = pd.Categorical(col.astype(str).to_numpy())
    if len(set(covariate_keys)) != len(covariate_keys):
        raise InputError(f"covariate keys repeat: {list(covariate_keys)}")

    if split_key is not None:
        split = split_from_column(obs_column(data.obs, split_key, "split", names))
    else:
        strata_cols = ([label_key] if label_key else []) + list(covariate_keys)
        strata = obs[strata_cols].astype(str).agg("|".join, axis=1) if strata_cols else None
        split = stratified_split(strata, len(obs), split_fractions, seed)
    obs[SPLIT_KEY] = as_split_categorical(split)
    if not (obs[SPLIT_KEY] == "train").any():
        raise InputError("no training cells after the split: give more cells or a split column with 'train' cells")
    return CellData(obs, counts, feature_names, observed, label_key, tuple(covariate_keys))
