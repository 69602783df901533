"""Checks run on input data before any work starts; each failure says what to do."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.errors import InputError


def invalid_counts(values: np.ndarray) -> np.ndarray:
    """Mask of the entries that are not raw counts: non-finite, negative or fractional."""
    return ~np.isfinite(values) | (values < 0) | (values != np.round(values))


def check_counts(name: str, x: sparse.csr_matrix) -> None:
    """Counts must be finite, non-negative and integer-valued (integer floats are fine)."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"modality {name!r} is empty ({x.shape[0]} cells x {x.shape[1]} features): pass data with cells and features")
    data = x.data
    if not np.isfinite(data).all():
        raise InputError(
            f"modality {name!r} has {int((~np.isfinite(data)).sum())} non-finite values (NaN or inf): "
            "the DGD models raw counts; pass the raw count matrix (for example layer='counts')"
        )
    if (data < 0).any():
        raise InputError(
            f"modality {name!r} has {int((data < 0).sum())} negative values: the DGD models raw counts, "
            "not normalised or scaled data; pass the raw count matrix (for example layer='counts')"
        )
    frac = data != np.round(data)
    if frac.any():
        example = data[frac][0]
        raise InputError(
            f"modality {name!r} has {int(frac.sum())} non-integer values (for example {example:g}): the DGD models "
            "raw counts, not normalised data; pass the raw count matrix (for example layer='counts')"
        )


def check_cells(obs_names: pd.Index, libraries: dict[str, np.ndarray]) -> None:
    if len(obs_names) == 0:
        raise InputError("the data has no cells: pass a non-empty AnnData/MuData")
    dup = obs_names[obs_names.duplicated()]
    if len(dup):
        raise InputError(
            f"{len(dup)} duplicate cell names (for example {str(dup[0])!r}): cell names identify representations; "
            "make them unique first (adata.obs_names_make_unique())"
        )
    total = sum(libraries.values())
    empty = np.flatnonzero(total == 0)
    if len(empty):
        names = ", ".join(repr(str(n)) for n in obs_names[empty[:3]])
        raise InputError(
            f"{len(empty)} cells have zero counts in every modality (for example {names}): they carry no "
            "information; remove them first (for example scanpy.pp.filter_cells(adata, min_counts=1))"
        )


def check_obs_key(obs: pd.DataFrame, key: str, role: str) -> None:
    if key not in obs.columns:
        cols = ", ".join(map(repr, list(obs.columns)[:20])) or "none"
        raise InputError(f"{role} key {key!r} is not a column of obs (columns: {cols}): pass one of those")


def check_covariate_values(obs: pd.DataFrame, key: str) -> None:
    missing = obs[key].isna()
    if missing.any():
        raise InputError(
            f"covariate {key!r} is missing for {int(missing.sum())} cells (for example {str(obs.index[missing][0])!r}): "
            "every training cell needs a class; fill them (for example with 'unknown') or drop those cells"
        )
