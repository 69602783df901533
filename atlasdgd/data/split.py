"""Train / validation / test assignment of cells, stratified and reproducible."""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasdgd.data.cells import SPLITS
from atlasdgd.errors import InputError

_ALIASES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
            "validation": "validation", "test": "test"}


def stratified_split(
    strata: pd.Series | None,
    n_cells: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """Split labels per cell; inside each stratum the shares follow ``fractions`` (rounded).

    Strata of one or two cells go to training, so every class is learned.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_cells, dtype=object)
    groups = (
        [np.arange(n_cells)]
        if strata is None
        else [np.asarray(g) for g in pd.Series(np.arange(n_cells)).groupby(strata.to_numpy(), dropna=False).groups.values()]
    )
    for rows in groups:
        rows = rng.permutation(rows)
        n = len(rows)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n - n_val - n_test < 1:
            n_val, n_test = 0, 0
        out[rows[:n_val]] = "validation"
        out[rows[n_val : n_val + n_test]] = "test"
        out[rows[n_val + n_test :]] = "train"
    return out


def split_from_column(values: pd.Series) -> np.ndarray:
    """Normalise a user-given split column (train/validation/test; 'val' and 'training' accepted)."""
    norm = values.astype(str).str.lower().map(_ALIASES)
    bad = values[norm.isna()]
    if len(bad):
        raise InputError(
            f"split column has {len(bad)} values that are not train/validation/test (for example {str(bad.iloc[0])!r}): "
            "use only those three"
        )
    return norm.to_numpy(dtype=object)


def as_split_categorical(split: np.ndarray) -> pd.Categorical:
    return pd.Categorical(split, categories=list(SPLITS))
