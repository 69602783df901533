"""StoreCells: a store (zarr or TileDB-SOMA) seen as training data, with the interface of CellData.

Nothing but the cell table is held in memory; counts are read by the streaming loader. The PCA start
is fitted on a sample of training cells and every cell is projected block by block.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from atlasdgd.data.cells import SPLIT_KEY, CellTable
from atlasdgd.errors import InputError
from atlasdgd.model.module import Batch
from atlasdgd.store.format import StoreError
from atlasdgd.train.init import centred_components, scale_to_radius


class StoreCells(CellTable):
    def __init__(self, store, label_key: str | None = None, covariate_keys: list[str] | tuple[str, ...] | None = None,
                 modalities: list[str] | None = None):
        self.store = store
        self.obs: pd.DataFrame = store.obs
        manifest = store.manifest
        self.label_key = manifest.label_key if label_key is None else label_key
        self.covariate_keys = tuple(manifest.covariate_keys if covariate_keys is None else covariate_keys)
        for key, role in [(self.label_key, "label")] + [(k, "covariate") for k in self.covariate_keys]:
            if key is not None and key not in self.obs.columns:
                raise InputError(f"{role} key {key!r} is not stored in {store.uri!r} (obs columns: {list(self.obs.columns)}): "
                                 "ingest again with that key")
        for key in self.covariate_keys:
            if not isinstance(self.obs[key].dtype, pd.CategoricalDtype):
                self.obs[key] = pd.Categorical(self.obs[key].astype(str))
        if self.label_key is not None and not isinstance(self.obs[self.label_key].dtype, pd.CategoricalDtype):
            self.obs[self.label_key] = pd.Categorical(self.obs[self.label_key])
        all_mods = store.modalities
        if modalities is not None:
            unknown = [m for m in modalities if m not in all_mods]
            if unknown:
                raise InputError(f"unknown modalities {unknown}: the store has {all_mods}")
        self._modalities = list(modalities) if modalities is not None else all_mods
        if SPLIT_KEY not in self.obs.columns:
            raise StoreError(f"{store.uri!r} has no {SPLIT_KEY!r} column: ingest it again")
        self.feature_names = {m: pd.Index(store.var[m].index.astype(str)) for m in self._modalities}
        self.observed = {m: self.obs[f"observed_{m}"].to_numpy().astype(bool) for m in self._modalities}
        self._library = {m: self.obs[f"library_{m}"].to_numpy().astype(np.float32) for m in self._modalities}
        self._covariates = self.covariate_codes()
        self.chunk_cells = int(store.manifest.chunk_cells)

    # -- the CellData interface (the rest comes from CellTable) -----------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self._modalities)

    def n_features(self, modality: str) -> int:
        return len(self.feature_names[modality])

    def library(self, modality: str) -> np.ndarray:
        return self._library[modality]

    def loader(self, rows: np.ndarray, batch_size: int = 128, shuffle: bool = True, seed: int = 0,
               rank: int = 0, world_size: int = 1, **options):
        from atlasdgd.store.loader import StreamingLoader

        return StreamingLoader(self, rows, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               **options)

    def batch(self, index: torch.Tensor, cells: np.ndarray, counts: dict[str, torch.Tensor]) -> Batch:
        observed = {m: torch.from_numpy(self.observed[m][cells]) for m in self._modalities}
        all_observed = all(bool(o.all()) for o in observed.values())
        return Batch(
            index=index,
            counts=counts,
            library={m: torch.from_numpy(self._library[m][cells]) for m in self._modalities},
            covariates=torch.from_numpy(self._covariates[cells]),
            observed=None if all_observed else observed,
            cells=torch.from_numpy(np.asarray(cells)),
        )

    # -- start positions -------------------------------------------------------------------
    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        return self.store.read_rows(modality, np.sort(rows))

    def pca_start(self, groups: np.ndarray, dim: int, radius: float, seed: int, fit_mask: np.ndarray,
                  max_fit_cells: int = 20_000, block_cells: int = 8192) -> np.ndarray:
        """Batch-centred PCA start (as :func:`atlasdgd.train.init.pca_representations`), fitted on at most
        ``max_fit_cells`` training cells read from the store and applied to every cell block by block."""
        rng = np.random.default_rng(seed)
        pool = np.flatnonzero(fit_mask)
        fit = np.sort(rng.choice(pool, size=min(len(pool), max_fit_cells), replace=False))
        targets = {}
        for m in self._modalities:
            lib = self._library[m][pool]
            targets[m] = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0

        def normalised(counts: dict[str, sparse.csr_matrix], cells: np.ndarray, weights=None) -> sparse.csr_matrix:
            parts = []
            for m in self._modalities:
                lib = self._library[m][cells].astype(np.float64)
                scale = np.divide(targets[m], lib, out=np.zeros_like(lib), where=lib > 0)
                y = sparse.csr_matrix(sparse.diags(scale) @ counts[m], dtype=np.float64)
                y.data = np.log1p(y.data)
                parts.append(y if weights is None else y * weights[m])
            return sparse.hstack(parts, format="csr")

        sample = {m: self.store.read_rows(m, fit) for m in self._modalities}
        weights = {}
        for m in self._modalities:
            y = normalised({mm: sample[mm] for mm in self._modalities}, fit).tocsc()[:, self._offsets(m)]
            var = np.asarray(y.multiply(y).mean(axis=0)).ravel() - np.asarray(y.mean(axis=0)).ravel() ** 2
            total = float(np.maximum(var, 0).sum())
            weights[m] = 1.0 / np.sqrt(total) if total > 0 else 1.0
        yf = normalised(sample, fit, weights)
        _, codes = np.unique(groups, return_inverse=True)
        n_groups = codes.max() + 1
        gf = codes[fit]
        onehot = sparse.csr_matrix((np.ones(len(fit)), (gf, np.arange(len(fit)))), shape=(n_groups, len(fit)))
        group_means = np.asarray((onehot @ yf).todense()) / np.maximum(np.bincount(gf, minlength=n_groups), 1)[:, None]
        k = min(dim, min(yf.shape) - 1)
        z = np.zeros((self.n_cells, dim), dtype=np.float32)  # float32: N x dim for every cell of the atlas
        if k < 1:
            return z.astype(np.float32)
        v = centred_components(yf, gf, group_means, k, seed)
        shift = group_means @ v
        for start in range(0, self.n_cells, block_cells):
            cells = np.arange(start, min(self.n_cells, start + block_cells))
            counts = {m: self.store.read_range(m, int(cells[0]), int(cells[-1]) + 1) for m in self._modalities}
            z[cells, :k] = normalised(counts, cells, weights) @ v - shift[codes[cells]]
        return scale_to_radius(z, pool, radius)

    def _offsets(self, modality: str) -> slice:
        start = 0
        for m in self._modalities:
            if m == modality:
                return slice(start, start + self.n_features(m))
            start += self.n_features(m)
        raise KeyError(modality)


def open_store(uri: str, storage_options: dict | None = None, **kwargs) -> StoreCells:
    """A store URI as training data: the zarr format, or a TileDB-SOMA experiment (``soma://`` prefix or
    a directory holding a SOMA experiment; pass ``measurements=`` / ``layer=`` via kwargs)."""
    from atlasdgd.store.soma import is_soma, SomaAtlasStore
    from atlasdgd.store.zarr_store import ZarrAtlasStore

    soma_options = {k: kwargs.pop(k) for k in ("measurements", "layer") if k in kwargs}
    store = SomaAtlasStore(uri, **soma_options) if is_soma(uri) else ZarrAtlasStore(uri, storage_options)
    return StoreCells(store, **kwargs)
