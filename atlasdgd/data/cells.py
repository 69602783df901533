"""CellData: validated counts and cell annotations, the in-memory form of a training set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data.source import LoadsBatches

SPLIT_KEY = "dgd_split"
SPLITS = ("train", "validation", "test")


class CellTable:
    """Accessors over a cell table (``obs``, ``label_key``, ``covariate_keys``) shared by every data
    source: in-memory :class:`CellData` and stores (:class:`~atlasdgd.store.cells.StoreCells`).

    The accessors read ``annotations``, the table by row: for data in memory that is ``obs``
    itself; a store keeps its annotations without the cell names (``obs_names`` reads them when
    asked), so training a million cells does not hold a million name strings."""

    obs: pd.DataFrame
    label_key: str | None
    covariate_keys: tuple[str, ...]

    @property
    def annotations(self) -> pd.DataFrame:
        return self.obs

    @property
    def n_cells(self) -> int:
        return self.annotations.shape[0]

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    def covariate_codes(self) -> np.ndarray:
        """``[N, Q]`` int64 class codes in ``covariate_keys`` order."""
        if not self.covariate_keys:
            return np.zeros((self.n_cells, 0), dtype=np.int64)
        table = self.annotations
        return np.stack([table[k].cat.codes.to_numpy().astype(np.int64) for k in self.covariate_keys], axis=1)

    def covariate_classes(self) -> dict[str, list[str]]:
        return {k: [str(c) for c in self.annotations[k].cat.categories] for k in self.covariate_keys}

    def label_classes(self) -> list[str]:
        return [str(c) for c in self.annotations[self.label_key].cat.categories] if self.label_key else []

    def label_codes(self) -> np.ndarray:
        """int64 label codes, -1 where a cell is unlabelled."""
        if not self.label_key:
            return np.full(self.n_cells, -1, dtype=np.int64)
        return self.annotations[self.label_key].cat.codes.to_numpy().astype(np.int64)

    def split_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.annotations[SPLIT_KEY].astype(str).to_numpy() == split)


@dataclass
class CellData(CellTable, LoadsBatches):
    """Counts per modality (CSR, cells in the same order) and one obs table.

    ``obs`` carries the label column (optional), one categorical column per covariate and the
    split column ``dgd_split`` (train / validation / test).
    """

    resident = True  # counts held in memory: the loader reads batches straight from them

    obs: pd.DataFrame
    counts: dict[str, sparse.csr_matrix]
    feature_names: dict[str, pd.Index]
    observed: dict[str, np.ndarray]
    label_key: str | None = None
    covariate_keys: tuple[str, ...] = ()

    @property
    def modalities(self) -> list[str]:
        return list(self.counts)

    def library(self, modality: str) -> np.ndarray:
        return np.asarray(self.counts[modality].sum(axis=1)).ravel().astype(np.float32)

    def n_features(self, modality: str) -> int:
        return self.counts[modality].shape[1]

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        return self.counts[modality][rows]
