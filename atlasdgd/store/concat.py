"""Several atlas stores read as one (an atlas's segments), in a given feature order.

A living atlas adds each batch as its own store (segment); fine-tuning trains on all of them. This
presents them with the read interface of one store, so :class:`~atlasdgd.store.cells.StoreCells`,
the one loader and the PCA start need nothing new. Counts are still read block by block from each
segment; columns are put in the model's feature order on the way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.store.format import NamedObsInMemory, StoreError


class ConcatStore(NamedObsInMemory):
    """Segments one after another; ``features``: modality -> the feature order to read in."""

    backend = "concat"

    def __init__(self, stores: list, features: dict[str, list[str]]):
        if not stores:
            raise StoreError("no segments to read")
        self.stores, self.uri = list(stores), " + ".join(s.uri for s in stores)
        self._columns: list[dict[str, np.ndarray]] = []
        for store in self.stores:
            columns = {}
            for m, names in features.items():
                if m not in store.modalities:
                    raise StoreError(f"segment {store.uri!r} has no modality {m!r}: it cannot be trained on with the rest")
                index = pd.Index(store.var[m].index.astype(str))
                pos = index.get_indexer(pd.Index(names))
                if (pos < 0).any():
                    missing = np.asarray(names)[pos < 0]
                    raise StoreError(f"segment {store.uri!r} lacks {len(missing)} {m} features of the model (for "
                                     f"example {missing[0]!r}): fine-tuning needs every feature in every segment")
                columns[m] = pos
            self._columns.append(columns)
        sizes = [s.n_cells for s in self.stores]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.obs = pd.concat([s.obs.astype({c: object for c in s.obs.columns
                                            if isinstance(s.obs[c].dtype, pd.CategoricalDtype)})
                              for s in self.stores])
        first = self.stores[0].manifest
        self.manifest = dataclasses.replace(
            first, n_cells=int(self._offsets[-1]),
            modalities={m: {"n_features": len(names), "nnz": 0} for m, names in features.items()},
            shuffled=False)
        self.var = {m: pd.DataFrame(index=pd.Index(names)) for m, names in features.items()}

    @property
    def n_cells(self) -> int:
        return int(self._offsets[-1])

    @property
    def modalities(self) -> list[str]:
        return list(self.var)

    def n_features(self, modality: str) -> int:
        return len(self.var[modality])

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        """Sorted rows as CSR, each segment's share read by that segment, columns in model order."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        parts = []
        for i in np.unique(which):
            local = rows[which == i] - self._offsets[i]
            block = self.stores[i].read_rows(modality, local)
            parts.append(sparse.csr_matrix(block[:, self._columns[i][modality]]))
        if not parts:
            return sparse.csr_matrix((0, self.n_features(modality)), dtype=np.float32)
        return sparse.vstack(parts, format="csr")

    def read_range(self, modality: str, start: int, stop: int) -> sparse.csr_matrix:
        return self.read_rows(modality, np.arange(start, stop))
