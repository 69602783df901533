"""`atlasdgd ingest`: h5ad / h5mu / AnnData zarr -> atlas store, out of core.

The input is opened lazily (anndata's backed sparse datasets on the HDF5/zarr groups); cells are read
in blocks of ``chunk_cells`` and written block by block, so memory is bounded by the block size, not
by the file. Per-feature detection counts for the optional feature filter are computed first, as
dask tasks over the same blocks (threads, in parallel with bounded memory); library sizes and the
stored per-feature statistics are computed on the way, after the filter. The cell order is one of
:data:`ORDERS` (block reads then gather their cells from anywhere in the input when it is not "input").
"""

from __future__ import annotations

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


def _check_block(name: str, block: sparse.csr_matrix, first_cell: int) -> None:
    try:
        validate.check_counts(name, block if block.shape[0] else sparse.csr_matrix((1, max(1, block.shape[1]))))
    except InputError as e:
        raise InputError(f"{e} (in cells {first_cell}-{first_cell + block.shape[0] - 1})") from None


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
        order: the store's cell order, one of :data:`ORDERS` (default "input"; ``shuffle=True`` is
            ``order="shuffle"``). "split" is the fastest for training: held-out cells are contiguous.
        min_cells_fraction: keep features detected in at least this fraction of cells.
    """
    from tqdm.auto import tqdm

    from atlasdgd import __version__

    if not Path(input_path).exists():
        raise InputError(f"input {input_path!r} does not exist")
    if not str(input_path).rstrip("/").endswith((".h5ad", ".h5mu", ".zarr")):
        raise InputError(f"cannot tell the format of {input_path!r}: use .h5ad, .h5mu or an AnnData .zarr")
    if not 0.0 <= min_cells_fraction < 1.0:
        raise InputError(f"min_cells_fraction must be in [0, 1), got {min_cells_fraction}")
    if chunk_cells < 1:
        raise InputError(f"chunk_cells must be >= 1, got {chunk_cells}")
    if order is not None and shuffle and order != "shuffle":
        raise InputError(f"shuffle=True and order={order!r} contradict each other: pass one")
    order = order or ("shuffle" if shuffle else "input")
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

    order_name, order = order, cell_order(obs[SPLIT_KEY].to_numpy(), order, seed)
    obs = obs.iloc[order]
    density = {}
    with _open(str(input_path)) as root:  # expected density from the first block sizes the chunks
        for m, mod in mods.items():
            probe = _read_block(root, mod, order[: min(n, 256)], len(mod.var))
            density[m] = probe.nnz / max(1, probe.shape[0]) * len(keep[m]) / max(1, len(mod.var))
    writer = StoreWriter(store_uri, n, {m: (len(keep[m]), density[m]) for m in mods}, chunk_cells=chunk_cells,
                         overwrite=overwrite, storage_options=storage_options)
    try:
        library = {m: np.zeros(n, np.float32) for m in mods}
        observed = {m: np.ones(n, bool) if mod.rows is None else mod.rows[order] >= 0 for m, mod in mods.items()}
        detected = {m: np.zeros(len(keep[m]), np.int64) for m in mods}
        totals = {m: np.zeros(len(keep[m]), np.float64) for m in mods}
        with _open(str(input_path)) as root:
            for start in tqdm(range(0, n, chunk_cells), desc="ingesting", unit="block", disable=not progress,
                              dynamic_ncols=True):
                cells = order[start : start + chunk_cells]
                any_counts = np.zeros(len(cells))
                for m, mod in mods.items():
                    block = _read_block(root, mod, cells, len(mod.var))
                    _check_block(m, block, start)
                    if len(keep[m]) != block.shape[1]:
                        block = sparse.csr_matrix(block[:, keep[m]])
                    block.eliminate_zeros()
                    lib = np.asarray(block.sum(axis=1)).ravel()
                    library[m][start : start + len(cells)] = lib
                    any_counts += lib
                    detected[m] += np.bincount(block.indices, minlength=block.shape[1])
                    totals[m] += np.asarray(block.sum(axis=0)).ravel()
                    writer.append(m, block)
                if (any_counts == 0).any():
                    bad = obs.index[start + int(np.flatnonzero(any_counts == 0)[0])]
                    raise InputError(f"cell {bad!r} has zero counts in every modality: filter empty cells first")
        for m in mods:
            obs[f"library_{m}"] = library[m]
            obs[f"observed_{m}"] = observed[m]
        var = {}
        for m, mod in mods.items():
            v = pd.DataFrame(index=pd.Index(mod.var.index.astype(str)[keep[m]]))
            v["n_cells_detected"] = detected[m]
            v["total_counts"] = totals[m]
            var[m] = v
        manifest = StoreManifest(
            n_cells=n,
            modalities={m: {"n_features": len(keep[m]), "nnz": int(detected[m].sum())} for m in mods},
            label_key=label_key, covariate_keys=list(covariate_keys), obs_columns=list(obs.columns),
            chunk_cells=chunk_cells, shuffled=order_name != "input", order=order_name,
            min_cells_fraction=min_cells_fraction,
            source=str(input_path), atlasdgd_version=__version__,
        )
        return writer.finish(obs, var, manifest)
    except BaseException:
        writer.abort()
        raise
