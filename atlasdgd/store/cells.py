"""StoreCells: a store (zarr or TileDB-SOMA) seen as training data, with the interface of CellData.

Nothing but the cell table is held in memory; counts are read block by block by the one loader
(:class:`~atlasdgd.data.loader.CellLoader`) and the PCA start (:func:`atlasdgd.train.init.pca_start`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data.cells import SPLIT_KEY, CellTable
from atlasdgd.data.source import LoadsBatches
from atlasdgd.errors import InputError
from atlasdgd.store.format import StoreError, with_names


READ_CELLS = 1024  # cells per contiguous read of a zarr store by the loader (see StoreCells)


class StoreCells(CellTable, LoadsBatches):
    """A store as training data. ``annotations`` holds the cell table by row; ``obs`` and ``obs_names``
    read the cell names from the store on each access (outputs need them, training does not)."""

    def __init__(self, store, label_key: str | None = None, covariate_keys: list[str] | tuple[str, ...] | None = None,
                 modalities: list[str] | None = None):
        self.store = store
        self._annotations: pd.DataFrame = store.annotations
        table, manifest = self._annotations, store.manifest
        self.label_key = manifest.label_key if label_key is None else label_key
        self.covariate_keys = tuple(manifest.covariate_keys if covariate_keys is None else covariate_keys)
        for key, role in [(self.label_key, "label")] + [(k, "covariate") for k in self.covariate_keys]:
            if key is not None and key not in table.columns:
                raise InputError(f"{role} key {key!r} is not stored in {store.uri!r} (obs columns: "
                                 f"{list(table.columns)}): ingest again with that key")
        for key in self.covariate_keys:
            if not isinstance(table[key].dtype, pd.CategoricalDtype):
                table[key] = pd.Categorical(table[key].astype(str))
        if self.label_key is not None and not isinstance(table[self.label_key].dtype, pd.CategoricalDtype):
            table[self.label_key] = pd.Categorical(table[self.label_key])
        all_mods = store.modalities
        if modalities is not None:
            unknown = [m for m in modalities if m not in all_mods]
            if unknown:
                raise InputError(f"unknown modalities {unknown}: the store has {all_mods}")
        self._modalities = list(modalities) if modalities is not None else all_mods
        if SPLIT_KEY not in table.columns:
            raise StoreError(f"{store.uri!r} has no {SPLIT_KEY!r} column: ingest it again")
        self.feature_names = {m: pd.Index(store.var[m].index.astype(str)) for m in self._modalities}
        self.observed = {m: table[f"observed_{m}"].to_numpy().astype(bool) for m in self._modalities}
        self._library = {m: table[f"library_{m}"].to_numpy().astype(np.float32) for m in self._modalities}
        # the loader's unit of shuffled reading, not the ingest block: zarr chunks hold at most 256k
        # non-zeros (a few hundred cells), so 1,024-cell reads decode no more than they need, and a
        # window of 4 of them (4,096 cells) holds a quarter of what 4,096-cell units did (a window
        # pipeline of ~16k-cell windows cost 100+ MiB at 200k cells, measured)
        self.chunk_cells = min(int(store.manifest.chunk_cells), READ_CELLS)

    # -- the CellData interface (the rest comes from CellTable) -----------------------------
    @property
    def annotations(self) -> pd.DataFrame:
        return self._annotations

    @property
    def obs_names(self) -> pd.Index:
        return self.store.obs_names

    @property
    def obs(self) -> pd.DataFrame:
        """The cell table indexed by cell name, built on each access (see ``with_names``)."""
        return with_names(self._annotations, self.obs_names)

    @property
    def modalities(self) -> list[str]:
        return list(self._modalities)

    def n_features(self, modality: str) -> int:
        return len(self.feature_names[modality])

    def library(self, modality: str) -> np.ndarray:
        return self._library[modality]

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        return self.store.read_rows(modality, np.sort(rows))

    def read_window(self, modality: str, blocks: list[np.ndarray], buffer) -> sparse.csr_matrix:
        """The rows of ``blocks``, in order, as one CSR in ``buffer`` (a
        :class:`~atlasdgd.data.window.WindowBuffer`): decoded straight into it where the store can
        (zarr), else read block by block and copied in."""
        blocks = [np.sort(b) for b in blocks]
        if hasattr(self.store, "read_window"):
            return self.store.read_window(modality, blocks, buffer)
        return buffer.join(self.read_row_blocks(modality, blocks))

    def read_row_blocks(self, modality: str, blocks: list[np.ndarray]) -> list[sparse.csr_matrix]:
        """Several blocks of rows at once: concurrently where the store can (zarr), else one by one."""
        if hasattr(self.store, "read_row_blocks"):
            return self.store.read_row_blocks(modality, [np.sort(b) for b in blocks])
        return [self.read_rows(modality, b) for b in blocks]


def open_store(uri: str, storage_options: dict | None = None, **kwargs) -> StoreCells:
    """A store URI as training data: the zarr format, or a TileDB-SOMA experiment (``soma://`` prefix or
    a directory holding a SOMA experiment; pass ``measurements=`` / ``layer=`` via kwargs)."""
    from atlasdgd.store.soma import is_soma, SomaAtlasStore
    from atlasdgd.store.zarr_store import ZarrAtlasStore

    soma_options = {k: kwargs.pop(k) for k in ("measurements", "layer") if k in kwargs}
    store = SomaAtlasStore(uri, **soma_options) if is_soma(uri) else ZarrAtlasStore(uri, storage_options)
    return StoreCells(store, **kwargs)
