"""`atlasdgd ingest`: h5ad / h5mu / AnnData zarr -> atlas store, out of core.

The input is opened lazily (anndata's backed sparse datasets on the HDF5/zarr groups); cells are read
in blocks of ``chunk_cells`` and written block by block, so memory is bounded by the block size, not
by the file. Per-feature detection counts for the optional feature filter are computed first, as
dask tasks over the same blocks (threads, in parallel with bounded memory); library sizes and the
stored per-feature statistics are computed on the way, after the filter. The cell order is one of
:data:`ORDERS` (block reads then gather their cells from anywhere in the input when it is not "input").
What is decided before counts are read (:func:`plan_ingest`) and the checked block pass
(:func:`count_blocks`) serve the TileDB-SOMA writer too (:func:`atlasdgd.store.soma.ingest_soma`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data import validate
from atlasdgd.data.adapters import modality_name
from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.data.split import as_split_categorical, split_from_column, stratified_split
from atlasdgd.errors import InputError
from atlasdgd.store.format import StoreManifest
from atlasdgd.store.zarr_store import StoreWriter


ORDERS = {
    "input": "the input's order",
    "shuffle": "a seeded random order (contiguous blocks are random samples)",
    # validation and test cells in contiguous ranges: evaluating them reads their chunks only, not
    # every chunk of the store (with scattered held-out cells, ~10x the bytes)
    "split": "[train | validation | test], each in a seeded random order",
}
# the default: the issue-12 measurements (one epoch, validation and a held-out epoch from a 200k-cell
# store) took 55 s and 669 MiB from a split store against 73-86 s and 748-780 MiB in the input's order
DEFAULT_ORDER = "split"


def cell_order(split: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The permutation of input cells into store rows for ``order`` (one of :data:`ORDERS`)."""
    n = len(split)
    rng = np.random.default_rng([seed, 7])
    if order == "input":
        return np.arange(n)
    if order == "shuffle":
        return rng.permutation(n)
    split = np.asarray(split).astype(str)
    names = ["train", "validation", "test"]
    parts = [rng.permutation(np.flatnonzero(split == s)) for s in names]
    parts.append(rng.permutation(np.flatnonzero(~np.isin(split, names))))
    return np.concatenate(parts)


@dataclass
class _Modality:
    path: str  # group of the count matrix inside the file
    var: pd.DataFrame
    rows: np.ndarray | None  # row in the modality for each cell (MuData obsmap - 1), -1 = absent; None = identity


@contextmanager
def _open(path: str):
    """The input's root group (h5py File or zarr Group)."""
    if path.rstrip("/").endswith(".zarr"):
        import zarr

        yield zarr.open_group(path, mode="r")
        return
    import h5py

    with h5py.File(path, "r") as f:
        yield f


def _matrix_path(root, base: str, layer: str | None) -> str:
    key = f"{base}X" if layer is None else f"{base}layers/{layer}"
    if key not in root:
        raise InputError(f"{key!r} is not in the input: pass an existing layer (or none for X)")
    return key


def _describe(path: str, layer: str | None):
    """obs and the modalities of an input file, without reading counts."""
    from anndata.io import read_elem

    with _open(path) as root:
        obs = read_elem(root["obs"])
        mods = {}
        if "mod" in root:  # MuData
            for name in root["mod"]:
                rows = np.asarray(root[f"obsmap/{name}"][:]).astype(np.int64) - 1 if f"obsmap/{name}" in root else None
                if rows is not None and np.array_equal(rows, np.arange(len(obs))):
                    rows = None
                mods[name] = _Modality(_matrix_path(root, f"mod/{name}/", layer), read_elem(root[f"mod/{name}/var"]), rows)
        else:
            mods["rna"] = _Modality(_matrix_path(root, "", layer), read_elem(root["var"]), None)
    return obs, mods


def _read_block(root, mod: _Modality, cells: np.ndarray, n_features: int) -> sparse.csr_matrix:
    """Rows of ``cells`` (any order) of one modality as CSR; absent cells are empty rows."""
    from anndata.io import sparse_dataset

    rows = cells if mod.rows is None else mod.rows[cells]
    present = rows >= 0
    out = sparse.csr_matrix((len(cells), n_features), dtype=np.float32)
    if not present.any():
        return out
    want = rows[present]
    order = np.argsort(want, kind="stable")
    sorted_rows = want[order]
    node = root[mod.path]
    if hasattr(node, "attrs") and str(node.attrs.get("encoding-type", "")) in ("csr_matrix", "csc_matrix"):
        ds = sparse_dataset(node)
        lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
        if hi - lo <= 2 * len(sorted_rows):  # dense enough: one contiguous read, then select
            block = sparse.csr_matrix(ds[lo:hi])[sorted_rows - lo]
        else:
            block = sparse.csr_matrix(ds[sorted_rows])
    else:  # dense array
        block = sparse.csr_matrix(np.asarray(node[int(sorted_rows[0]) : int(sorted_rows[-1]) + 1])[sorted_rows - sorted_rows[0]])
    block = block.astype(np.float32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    block = block[inverse]
    if present.all():
        return sparse.csr_matrix(block)
    placed = sparse.lil_matrix((len(cells), n_features), dtype=np.float32)
    placed[np.flatnonzero(present)] = block
    return sparse.csr_matrix(placed)


def _check_block(name: str, block: sparse.csr_matrix, cells: np.ndarray) -> None:
    """Raises where the block of input rows ``cells`` (in store order) does not hold raw counts,
    naming the input rows at fault (a store's order need not be the input's)."""
    try:
        validate.check_counts(name, block if block.shape[0] else sparse.csr_matrix((1, max(1, block.shape[1]))))
    except InputError as e:
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[validate.invalid_counts(block.data)]
        at_fault = np.unique(np.asarray(cells)[rows]) if len(rows) else np.sort(np.asarray(cells))
        shown = ", ".join(str(int(c)) for c in at_fault[:5])
        more = f", ... ({len(at_fault)} in all)" if len(at_fault) > 5 else ""
        raise InputError(f"{e} (input rows {shown}{more}; 0-based)") from None


def _detection_counts(path: str, mods: dict[str, _Modality], n_cells: int, chunk_cells: int) -> dict[str, np.ndarray]:
    """Cells in which each feature is detected, per modality: one dask task per block."""
    import dask

    def block_counts(name: str, start: int, stop: int) -> np.ndarray:
        with _open(path) as root:
            block = _read_block(root, mods[name], np.arange(start, stop), len(mods[name].var))
        return np.bincount(block.indices, minlength=block.shape[1])

    out = {}
    for name in mods:
        tasks = [dask.delayed(block_counts)(name, s, min(n_cells, s + chunk_cells)) for s in range(0, n_cells, chunk_cells)]
        out[name] = np.sum(dask.compute(*tasks, scheduler="threads", num_workers=2), axis=0)
    return out


@dataclass
class IngestPlan:
    """Everything an ingest decides before it reads counts: checked first, so bad input fails
    before anything is written. Shared by the zarr store and the TileDB-SOMA writer."""

    input_path: str
    obs: pd.DataFrame  # the cell table in store order (library and observed columns come with the counts)
    mods: dict[str, _Modality]
    keep: dict[str, np.ndarray]  # kept features per modality
    order: np.ndarray  # input cell of each store row
    order_name: str

    @property
    def n_cells(self) -> int:
        return len(self.order)

    def feature_names(self, modality: str) -> pd.Index:
        """Names of the kept features of ``modality``, in store order."""
        return pd.Index(self.mods[modality].var.index.astype(str)[self.keep[modality]])

    def observed(self, modality: str) -> np.ndarray:
        rows = self.mods[modality].rows
        return np.ones(self.n_cells, bool) if rows is None else rows[self.order] >= 0

    def density(self) -> dict[str, float]:
        """Expected non-zeros per cell and kept feature, from the first cells (sizes the zarr chunks)."""
        out = {}
        with _open(self.input_path) as root:
            for m, mod in self.mods.items():
                probe = _read_block(root, mod, self.order[: min(self.n_cells, 256)], len(mod.var))
                out[m] = probe.nnz / max(1, probe.shape[0]) * len(self.keep[m]) / max(1, len(mod.var))
        return out


def plan_ingest(
    input_path: str,
    *,
    label_key: str | None = None,
    covariate_keys: list[str] | tuple[str, ...] = (),
    split_key: str | None = None,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    layer: str | None = None,
    order: str = DEFAULT_ORDER,
    min_cells_fraction: float = 0.0,
    chunk_cells: int = 4096,
    seed: int = 0,
) -> IngestPlan:
    """The cell table, split, kept features and cell order of an ingest (see :func:`ingest`); reads
    no counts unless ``min_cells_fraction`` needs detection counts."""
    if not Path(input_path).exists():
        raise InputError(f"input {input_path!r} does not exist")
    if not str(input_path).rstrip("/").endswith((".h5ad", ".h5mu", ".zarr")):
        raise InputError(f"cannot tell the format of {input_path!r}: use .h5ad, .h5mu or an AnnData .zarr")
    if not 0.0 <= min_cells_fraction < 1.0:
        raise InputError(f"min_cells_fraction must be in [0, 1), got {min_cells_fraction}")
    if chunk_cells < 1:
        raise InputError(f"chunk_cells must be >= 1, got {chunk_cells}")
    if order not in ORDERS:
        raise InputError(f"unknown cell order {order!r}: use one of {sorted(ORDERS)}")
    obs_in, mods = _describe(str(input_path), layer)
    mods = {(modality_name(k) if not k.isidentifier() else k): v for k, v in mods.items()}
    n = len(obs_in)
    if n == 0:
        raise InputError("the input has no cells")

    # the cell table first: every check on it runs before any counts are read
    obs = pd.DataFrame(index=pd.Index(obs_in.index.astype(str)))
    if obs.index.duplicated().any():
        raise InputError("duplicate cell names: make them unique first (adata.obs_names_make_unique())")
    for key, role in [(label_key, "label")] + [(k, "covariate") for k in covariate_keys] + [(split_key, "split")]:
        if key is not None:
            validate.check_obs_key(obs_in, key, role)
    if label_key:
        obs[label_key] = pd.Categorical(obs_in[label_key].to_numpy())
    for key in covariate_keys:
        col = pd.Series(obs_in[key].to_numpy(), index=obs.index)
        validate.check_covariate_values(col.to_frame(key), key)
        obs[key] = pd.Categorical(col.astype(str).to_numpy())
    # every other obs column travels too (an atlas keeps its metadata; a later --label-key may name one)
    reserved = set(obs.columns) | {SPLIT_KEY, split_key} | {f"{p}_{m}" for p in ("library", "observed") for m in mods}
    for key in obs_in.columns:
        if key in reserved:
            continue
        col = obs_in[key]
        if col.dtype == object or isinstance(col.dtype, pd.CategoricalDtype):
            values = col.astype(object).to_numpy()
            obs[str(key)] = pd.Categorical([None if pd.isna(v) else str(v) for v in values])
        else:
            obs[str(key)] = col.to_numpy()
    if split_key:
        split = split_from_column(obs_in[split_key])
    else:
        cols = ([label_key] if label_key else []) + list(covariate_keys)
        strata = obs[cols].astype(str).agg("|".join, axis=1) if cols else None
        split = stratified_split(strata, n, split_fractions, seed)
    obs[SPLIT_KEY] = as_split_categorical(split)

    keep = {m: np.arange(len(mod.var)) for m, mod in mods.items()}
    if min_cells_fraction > 0:
        detected = _detection_counts(str(input_path), mods, n, chunk_cells)
        keep = {m: np.flatnonzero(d >= min_cells_fraction * n) for m, d in detected.items()}
        empty = [m for m, k in keep.items() if len(k) == 0]
        if empty:
            raise InputError(f"no feature of {empty} is detected in {min_cells_fraction:.1%} of cells: lower --min-cells-fraction")
    permutation = cell_order(obs[SPLIT_KEY].to_numpy(), order, seed)
    return IngestPlan(str(input_path), obs.iloc[permutation], mods, keep, permutation, order)


class BlockTotals:
    """Per-cell library sizes and per-feature detection counts and totals, summed over the blocks."""

    def __init__(self, plan: IngestPlan):
        self.library = {m: np.zeros(plan.n_cells, np.float32) for m in plan.mods}
        self.detected = {m: np.zeros(len(plan.keep[m]), np.int64) for m in plan.mods}
        self.totals = {m: np.zeros(len(plan.keep[m]), np.float64) for m in plan.mods}

    def add(self, modality: str, start: int, block: sparse.csr_matrix) -> None:
        self.library[modality][start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        self.detected[modality] += np.bincount(block.indices, minlength=block.shape[1])
        self.totals[modality] += np.asarray(block.sum(axis=0)).ravel()


def count_blocks(plan: IngestPlan, chunk_cells: int, totals: BlockTotals, progress: bool = True,
                 desc: str = "ingesting") -> Iterator[tuple[int, dict[str, sparse.csr_matrix]]]:
    """``(first store row, modality -> CSR block)`` of ``chunk_cells`` cells at a time in store order:
    checked (integer counts, no cell empty in every modality), filtered to the kept features,
    explicit zeros removed, and added to ``totals``. Memory is one block per modality."""
    from tqdm.auto import tqdm

    order = plan.order
    with _open(plan.input_path) as root:
        for start in tqdm(range(0, plan.n_cells, chunk_cells), desc=desc, unit="block", disable=not progress,
                          dynamic_ncols=True):
            cells = order[start : start + chunk_cells]
            blocks = {}
            for m, mod in plan.mods.items():
                block = _read_block(root, mod, cells, len(mod.var))
                _check_block(m, block, cells)
                if len(plan.keep[m]) != block.shape[1]:
                    block = sparse.csr_matrix(block[:, plan.keep[m]])
                block.eliminate_zeros()
                totals.add(m, start, block)
                blocks[m] = block
            any_counts = sum(totals.library[m][start : start + len(cells)] for m in plan.mods)
            if (any_counts == 0).any():
                bad = plan.obs.index[start + int(np.flatnonzero(any_counts == 0)[0])]
                raise InputError(f"cell {bad!r} has zero counts in every modality: filter empty cells first")
            yield start, blocks


def ingest(
    input_path: str,
    store_uri: str,
    *,
    label_key: str | None = None,
    covariate_keys: list[str] | tuple[str, ...] = (),
    split_key: str | None = None,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    layer: str | None = None,
    shuffle: bool = False,
    order: str | None = None,
    min_cells_fraction: float = 0.0,
    chunk_cells: int = 4096,
    seed: int = 0,
    overwrite: bool = False,
    storage_options: dict | None = None,
    progress: bool = True,
) -> str:
    """Convert an input file into an atlas store; returns the store URI.

    Args:
        label_key, covariate_keys, split_key: the store's default label and covariates (covariates become
            categorical); without ``split_key`` a stratified ``split_fractions`` split (seeded) is stored.
            Every other obs column is kept as well (text as categoricals), so a later training run
            may name any of them.
        order: the store's cell order, one of :data:`ORDERS` (default "split", the fastest to train
            from: held-out cells are contiguous; ``shuffle=True`` is ``order="shuffle"``; "input"
            keeps the input's order).
        min_cells_fraction: keep features detected in at least this fraction of cells.
    """
    from atlasdgd import __version__

    if order is not None and shuffle and order != "shuffle":
        raise InputError(f"shuffle=True and order={order!r} contradict each other: pass one")
    plan = plan_ingest(input_path, label_key=label_key, covariate_keys=covariate_keys, split_key=split_key,
                       split_fractions=split_fractions, layer=layer, order=order or ("shuffle" if shuffle else DEFAULT_ORDER),
                       min_cells_fraction=min_cells_fraction, chunk_cells=chunk_cells, seed=seed)
    density = plan.density()
    writer = StoreWriter(store_uri, plan.n_cells, {m: (len(plan.keep[m]), density[m]) for m in plan.mods},
                         chunk_cells=chunk_cells, overwrite=overwrite, storage_options=storage_options)
    try:
        totals = BlockTotals(plan)
        for _, blocks in count_blocks(plan, chunk_cells, totals, progress):
            for m, block in blocks.items():
                writer.append(m, block)
        obs = plan.obs
        for m in plan.mods:
            obs[f"library_{m}"] = totals.library[m]
            obs[f"observed_{m}"] = plan.observed(m)
        var = {}
        for m in plan.mods:
            v = pd.DataFrame(index=plan.feature_names(m))
            v["n_cells_detected"] = totals.detected[m]
            v["total_counts"] = totals.totals[m]
            var[m] = v
        manifest = StoreManifest(
            n_cells=plan.n_cells,
            modalities={m: {"n_features": len(plan.keep[m]), "nnz": int(totals.detected[m].sum())} for m in plan.mods},
            label_key=label_key, covariate_keys=list(covariate_keys), obs_columns=list(obs.columns),
            chunk_cells=chunk_cells, shuffled=plan.order_name != "input", order=plan.order_name,
            min_cells_fraction=min_cells_fraction,
            source=str(input_path), atlasdgd_version=__version__,
        )
        return writer.finish(obs, var, manifest)
    except BaseException:
        writer.abort()
        raise
