"""TileDB-SOMA as a second store backend: read an experiment as an atlas store, ingest into one.

An experiment has one measurement per modality with counts in ``X[layer]``. Experiments written by
:func:`ingest_soma` carry atlasdgd's obs columns (split, library sizes, observed flags, label and
covariates); for any other experiment they are computed when it is opened (one pass over X) and a
stratified split is drawn. SOMA handles are opened lazily in the process that reads (an experiment
opened before a fork hangs in the child), and the cell table is read with the handle closed again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.errors import missing_extra
from atlasdgd.data.split import as_split_categorical, stratified_split
from atlasdgd.store.format import NamedObsInMemory, StoreError, StoreManifest

SCHEME = "soma://"
DEFAULT_LAYER = "counts"
META_KEY = "atlasdgd"  # experiment metadata: label and covariate keys, chunking


def _soma():
    """tiledbsoma (with its io module), or an error naming the extra that installs it."""
    try:
        import tiledbsoma
        import tiledbsoma.io  # noqa: F401
    except ImportError as e:
        raise missing_extra("TileDB-SOMA experiments", "tiledbsoma", "soma") from e
    return tiledbsoma


def is_soma(uri: str) -> bool:
    uri = str(uri)
    if uri.startswith(SCHEME):
        return True
    p = Path(uri)
    return p.is_dir() and (p / "ms").is_dir() and (p / "obs").is_dir()


def _path(uri: str) -> str:
    return str(uri)[len(SCHEME):] if str(uri).startswith(SCHEME) else str(uri)


class SomaAtlasStore(NamedObsInMemory):
    """Read access to a SOMA experiment with the same interface as the zarr store."""

    backend = "soma"

    def __init__(self, uri: str, measurements: list[str] | None = None, layer: str | None = None,
                 chunk_cells: int = 4096, seed: int = 0):
        import json

        tiledbsoma = _soma()

        self.uri, self.path = str(uri), _path(uri)
        self._exp, self._pid = None, None
        try:
            with tiledbsoma.Experiment.open(self.path) as exp:
                meta = json.loads(exp.metadata.get(META_KEY, "{}"))
                names = measurements or list(exp.ms.keys())
                self.layer = layer or meta.get("layer", DEFAULT_LAYER)
                obs = exp.obs.read().concat().to_pandas()
                self.var = {}
                for m in names:
                    if m not in exp.ms:
                        raise StoreError(f"{self.uri!r} has no measurement {m!r} (it has {list(exp.ms.keys())})")
                    if self.layer not in exp.ms[m].X:
                        raise StoreError(f"measurement {m!r} of {self.uri!r} has no X layer {self.layer!r} "
                                         f"(layers: {list(exp.ms[m].X.keys())}): pass layer=...")
                    var = exp.ms[m].var.read().concat().to_pandas()
                    self.var[m] = var.set_index(_id_column(var, "var_id")).drop(columns=["soma_joinid"])
        except StoreError:
            raise
        except Exception as e:  # tiledbsoma raises its own types for missing or broken experiments
            raise StoreError(f"cannot open the SOMA experiment {self.uri!r}: {e}") from e
        obs = obs.sort_values("soma_joinid")
        if not np.array_equal(obs["soma_joinid"].to_numpy(), np.arange(len(obs))):
            raise StoreError(f"{self.uri!r}: obs soma_joinids are not 0..n-1; atlasdgd reads experiments written in one go")
        self.obs = obs.set_index(_id_column(obs, "obs_id")).drop(columns=["soma_joinid"])
        self.obs.index = self.obs.index.astype(str)
        self._names = names
        if any(f"library_{m}" not in self.obs for m in names):
            self._add_library_columns(chunk_cells)
        if SPLIT_KEY not in self.obs:
            self.obs[SPLIT_KEY] = as_split_categorical(stratified_split(None, len(self.obs), (0.8, 0.1, 0.1), seed))
        self.manifest = StoreManifest(
            n_cells=len(self.obs),
            modalities={m: {"n_features": len(self.var[m]), "nnz": -1} for m in names},
            label_key=meta.get("label_key"), covariate_keys=list(meta.get("covariate_keys", [])),
            obs_columns=list(self.obs.columns), chunk_cells=int(meta.get("chunk_cells", chunk_cells)),
            source=self.uri,
        )

    def _add_library_columns(self, chunk_cells: int) -> None:
        n = len(self.obs)
        for m in self._names:
            lib = np.zeros(n, np.float32)
            for start in range(0, n, chunk_cells):
                stop = min(n, start + chunk_cells)
                lib[start:stop] = np.asarray(self.read_range(m, start, stop).sum(axis=1)).ravel()
            self.obs[f"library_{m}"] = lib
            self.obs[f"observed_{m}"] = lib > 0

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def modalities(self) -> list[str]:
        return list(self._names)

    def n_features(self, modality: str) -> int:
        return len(self.var[modality])

    def _experiment(self):
        tiledbsoma = _soma()

        if self._exp is None or self._pid != os.getpid():  # never reuse a handle across processes
            self._exp, self._pid = tiledbsoma.Experiment.open(self.path), os.getpid()
        return self._exp

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        f = self.n_features(modality)
        if len(rows) == 0:
            return sparse.csr_matrix((0, f), dtype=np.float32)
        X = self._experiment().ms[modality].X[self.layer]
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        coords = (slice(int(rows[0]), int(rows[-1])), slice(None)) if contiguous else (rows, slice(None))
        tbl = X.read(coords=coords).tables().concat()
        i = tbl.column("soma_dim_0").to_numpy()
        j = tbl.column("soma_dim_1").to_numpy()
        v = tbl.column("soma_data").to_numpy().astype(np.float32)
        local = np.searchsorted(rows, i)
        out = sparse.csr_matrix((v, (local, j)), shape=(len(rows), f))
        out.sum_duplicates()
        if len(out.data) and not np.array_equal(out.data, np.round(out.data)):
            raise StoreError(f"{self.uri!r}: measurement {modality!r} layer {self.layer!r} has non-integer counts: "
                             "pass the raw-count layer")
        return out

    def read_range(self, modality: str, start: int, stop: int) -> sparse.csr_matrix:
        return self.read_rows(modality, np.arange(start, stop))

    def close(self) -> None:
        if self._exp is not None:
            self._exp.close()
            self._exp = None


def _id_column(df: pd.DataFrame, preferred: str) -> str:
    if preferred in df.columns:
        return preferred
    others = [c for c in df.columns if c != "soma_joinid" and df[c].dtype == object]
    if not others:
        raise StoreError(f"no id column ({preferred!r}) in a SOMA dataframe with columns {list(df.columns)}")
    return others[0]


def ingest_soma(input_path: str, uri: str, *, label_key: str | None = None, covariate_keys=(), split_key=None,
                layer: str | None = None, min_cells_fraction: float = 0.0, order: str | None = None, seed: int = 0,
                overwrite: bool = False, chunk_cells: int = 4096, progress: bool = False) -> str:
    """Write an .h5ad/.h5mu/AnnData .zarr into a SOMA experiment (one measurement per modality, X layer
    ``counts``) with atlasdgd's obs columns, out of core like :func:`~atlasdgd.store.ingest.ingest` and
    with the same cell table and split: checks first, then the counts block by block (memory is one
    block of ``chunk_cells`` cells, not the input), the library sizes into obs last. ``order`` and
    ``min_cells_fraction`` as in the zarr ingest (default "split": held-out cells are contiguous joinid ranges).
    Written to a temporary directory beside ``uri`` and moved into place at the end."""
    import json
    import shutil
    import tempfile

    import anndata as ad
    import pyarrow as pa
    tiledbsoma = _soma()
    soma_io = tiledbsoma.io

    from atlasdgd.store.ingest import DEFAULT_ORDER, BlockTotals, count_blocks, plan_ingest

    path = Path(_path(uri))
    if path.exists() and not overwrite:
        raise StoreError(f"{str(path)!r} already exists: choose another URI or pass overwrite (--overwrite)")
    if not path.parent.is_dir():
        raise StoreError(f"the folder {str(path.parent)!r} for the experiment does not exist: create it first")
    plan = plan_ingest(input_path, label_key=label_key, covariate_keys=covariate_keys, split_key=split_key,
                       layer=layer, order=order or DEFAULT_ORDER, min_cells_fraction=min_cells_fraction, chunk_cells=chunk_cells,
                       seed=seed)
    names = {m: plan.feature_names(m).to_numpy() for m in plan.mods}
    obs = plan.obs.copy()
    obs.index.name = "obs_id"
    for m in plan.mods:  # library sizes are known after the counts: zeros until then
        obs[f"library_{m}"] = np.zeros(plan.n_cells, np.float32)
        obs[f"observed_{m}"] = plan.observed(m)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    shutil.rmtree(tmp)
    try:
        first = next(iter(plan.mods))
        # obs, the first measurement and its var through tiledbsoma's own writer (its conventions for
        # ids and categoricals); X is left out (None) and written below, block by block
        soma_io.from_anndata(str(tmp), ad.AnnData(obs=obs, var=pd.DataFrame(index=plan.feature_names(first))), first,
                             X_layer_name=DEFAULT_LAYER)
        with tiledbsoma.Experiment.open(str(tmp), "w") as exp:
            arrays = {}
            for m in plan.mods:
                if m == first:
                    X = exp.ms[m].X
                else:
                    ms = exp.ms.add_new_collection(m, tiledbsoma.Measurement)
                    schema = pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string())])
                    var = ms.add_new_dataframe("var", schema=schema, index_column_names=["soma_joinid"],
                                               domain=[(0, len(names[m]) - 1)])
                    var.write(pa.Table.from_pydict({"soma_joinid": np.arange(len(names[m])), "var_id": names[m]},
                                                   schema=schema))
                    X = ms.add_new_collection("X")
                arrays[m] = X.add_new_sparse_ndarray(DEFAULT_LAYER, type=pa.float32(),
                                                     shape=(plan.n_cells, len(names[m])))
            totals = BlockTotals(plan)
            for start, blocks in count_blocks(plan, chunk_cells, totals, progress, desc="ingesting into SOMA"):
                for m, block in blocks.items():
                    if block.nnz == 0:
                        continue
                    coo = block.tocoo()
                    arrays[m].write(pa.Table.from_pydict({
                        "soma_dim_0": coo.row.astype(np.int64) + start, "soma_dim_1": coo.col.astype(np.int64),
                        "soma_data": coo.data.astype(np.float32)}))
            exp.metadata[META_KEY] = json.dumps({"label_key": label_key, "covariate_keys": list(covariate_keys),
                                                 "layer": DEFAULT_LAYER, "chunk_cells": chunk_cells,
                                                 "order": plan.order_name})
        for m in plan.mods:
            obs[f"library_{m}"] = totals.library[m]
        with tiledbsoma.Experiment.open(str(tmp), "w") as exp:
            soma_io.update_obs(exp, obs.reset_index(), default_index_name="obs_id")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)


def read_soma_query(uri: str, layer: str | None = None, measurements: list[str] | None = None):
    """A SOMA experiment as query data: AnnData for one measurement, MuData for several, counts from X
    ``layer`` (default: the layer atlasdgd ingested, else ``counts``). Read into memory, like an .h5ad
    query; cell ids are the experiment's obs ids, so results can be written back
    (:func:`write_soma_results`)."""
    import json

    tiledbsoma = _soma()
    soma_io = tiledbsoma.io

    path = _path(uri)
    try:
        with tiledbsoma.Experiment.open(path) as exp:
            names = measurements or list(exp.ms.keys())
            layer = layer or json.loads(exp.metadata.get(META_KEY, "{}")).get("layer", DEFAULT_LAYER)
            for m in names:
                if m not in exp.ms:
                    raise StoreError(f"{uri!r} has no measurement {m!r} (it has {list(exp.ms.keys())})")
                if layer not in exp.ms[m].X:
                    raise StoreError(f"measurement {m!r} of {uri!r} has no X layer {layer!r} "
                                     f"(layers: {list(exp.ms[m].X.keys())}): pass --layer NAME")
            mods = {m: soma_io.to_anndata(exp, m, X_layer_name=layer) for m in names}
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"cannot read the SOMA experiment {uri!r}: {e}") from e
    for a in mods.values():
        a.obs_names = a.obs_names.astype(str)
        a.X = sparse.csr_matrix(a.X) if a.X is not None else None
    if len(mods) == 1:
        return next(iter(mods.values()))
    import mudata

    md = mudata.MuData(mods)
    md.obs = next(iter(mods.values())).obs.reindex(md.obs_names)  # one obs per experiment, shared by all
    return md


def write_soma_results(uri: str, table, measurement: str | None = None, overwrite: bool = False) -> dict:
    """Write a results table (obs columns starting ``dgd_`` but the split, obsm arrays; from
    ``DGD.map``/``embed``) into the SOMA experiment its cells come from: obs columns into the
    experiment's obs, obsm arrays into ``measurement``'s obsm (default: every measurement's, so each
    modality's AnnData view has them; they are cells x a few columns). Everything is checked before anything is
    written (every cell id known, no existing key replaced without ``overwrite``); SOMA has no
    multi-array transaction, so the obsm arrays are written first and obs last. Cells of the
    experiment missing from ``table`` get missing values. Returns what was written."""
    tiledbsoma = _soma()
    soma_io = tiledbsoma.io

    path = _path(uri)
    # results only: the split is the experiment's own (written at ingest or drawn when opened)
    new_cols = [c for c in table.obs.columns if str(c).startswith("dgd_") and c != SPLIT_KEY]
    with tiledbsoma.Experiment.open(path) as exp:
        targets = [measurement] if measurement else list(exp.ms.keys())
        for m in targets:
            if m not in exp.ms:
                raise StoreError(f"{uri!r} has no measurement {m!r} (it has {list(exp.ms.keys())})")
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        id_col = _id_column(obs, "obs_id")
        ids = obs[id_col].astype(str).to_numpy()
        existing = {m: list(exp.ms[m].obsm.keys()) if "obsm" in exp.ms[m] else [] for m in targets}
        widths = {(m, k): exp.ms[m].obsm[k].shape[1] for m in targets for k in table.obsm if k in existing[m]}
    position = pd.Index(ids).get_indexer(table.obs_names.astype(str))
    if (position < 0).any():
        missing = list(table.obs_names[position < 0][:5])
        raise StoreError(f"{int((position < 0).sum())} cells of the results are not in {uri!r} (e.g. {missing}): "
                         "write them to the experiment they were read from, or to an .h5ad/.h5mu")
    wrong = [f"{m}/{k}" for (m, k), w in widths.items() if w != np.asarray(table.obsm[k]).shape[1]]
    if wrong:
        raise StoreError(f"{uri!r} has obsm arrays {wrong} of another width (another model's results): remove them first")
    clash = sorted({k for m in targets for k in table.obsm if k in existing[m]} | {c for c in new_cols if c in obs.columns})
    if clash and not overwrite:
        raise StoreError(f"{uri!r} already has {clash}: pass --overwrite to replace them")
    for key, value in table.obsm.items():
        full = np.full((len(ids), np.asarray(value).shape[1]), np.nan, dtype=np.float32)
        full[position] = np.asarray(value, dtype=np.float32)
        for m in targets:
            # one open per array: tiledbsoma closes the obsm collection it creates on the first write
            with tiledbsoma.Experiment.open(path, "w") as exp:
                if key in existing[m]:
                    soma_io.update_matrix(exp.ms[m].obsm[key], full)
                else:
                    soma_io.add_matrix_to_collection(exp, m, "obsm", key, full)
    updated = obs.drop(columns=["soma_joinid"]).set_index(id_col)
    for c in new_cols:
        col = table.obs[c]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(str)  # SOMA stores categories per value; missing cells become ""
        values = pd.Series(col.to_numpy(), index=table.obs_names.astype(str)).reindex(updated.index)
        updated[c] = values.fillna("") if values.dtype == object else values
    with tiledbsoma.Experiment.open(path, "w") as exp:
        soma_io.update_obs(exp, updated.reset_index(), default_index_name=id_col)
    return {"obs": new_cols, "obsm": {m: list(table.obsm) for m in targets}}
