"""The atlas store: an explicit, versioned on-disk format at any fsspec URI.

    STORE/                         (a zarr v3 group; local path, file://, memory://, s3://, ...)
      atlasdgd-store.json          manifest, written last: format + version, n_cells, per modality
                                   n_features / nnz, obs columns and their roles, chunking, whether
                                   the cell order was shuffled, feature filter
      obs/                         AnnData dataframe encoding: cell ids (index), label, covariates
                                   (categorical), every other input obs column, dgd_split,
                                   library_<modality>, observed_<modality>
      mod/<modality>/              a complete AnnData group: anndata.read_zarr(STORE/mod/rna) opens it
        X/                         CSR in anndata's encoding (indptr int64, indices int32, data
                                   float32); data/indices chunked and sharded along cells (chunks of
                                   at most 256k non-zeros, ``shard_chunks`` per shard),
                                   Blosc lz4 + byte shuffle
        obs/                       cell ids only
        var/                       feature names; n_cells_detected, total_counts

A store without its manifest is incomplete (an interrupted ingest) and never opens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pandas as pd

from atlasdgd.errors import AtlasDGDError
from atlasdgd.io.manifest import ManifestKind
from atlasdgd.io.manifest import read_manifest as read_versioned
from atlasdgd.io.uri import filesystem as _filesystem

FORMAT = "atlasdgd-store"
FORMAT_VERSION = 1
MANIFEST = "atlasdgd-store.json"


class StoreError(AtlasDGDError):
    """A store is missing, incomplete, of another format or version, or inconsistent."""


STORE_MANIFEST = ManifestKind(MANIFEST, FORMAT, FORMAT_VERSION, "atlas store", StoreError,
                              incomplete="an interrupted ingest? Ingest again with --overwrite",
                              outdated="re-ingest it, or use the atlasdgd version that wrote it",
                              family="atlasdgd store")


class NamedObsInMemory:
    """The store protocol's ``annotations`` (by row) and ``obs_names`` for a store that holds its
    named ``obs`` in memory anyway (SOMA, concatenated segments); the zarr store keeps only the
    annotations and reads the names when asked."""

    obs: pd.DataFrame

    @property
    def annotations(self) -> pd.DataFrame:
        table = self.obs.copy(deep=False)  # the columns are shared, not copied
        table.index = pd.RangeIndex(len(table))
        return table

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index


def with_names(annotations: pd.DataFrame, names: pd.Index) -> pd.DataFrame:
    """``annotations`` (by row) indexed by cell ``names``: a new frame sharing the columns (columns
    set on it are not kept; values changed in place are)."""
    table = annotations.copy(deep=False)
    table.index = names
    return table


@dataclass
class StoreManifest:
    n_cells: int
    modalities: dict[str, dict]  # name -> {"n_features": int, "nnz": int}
    label_key: str | None = None
    covariate_keys: list[str] = field(default_factory=list)
    obs_columns: list[str] = field(default_factory=list)
    chunk_cells: int = 4096
    shard_chunks: int = 32
    shuffled: bool = False
    order: str = "input"  # "input", "shuffle" or "split" (see atlasdgd.store.ingest.ORDERS)
    min_cells_fraction: float = 0.0
    source: str = ""
    # every count was checked to be a whole number when written (StoreWriter does): readers need not
    # check each read again. Stores written before this field read as False and are checked on read
    counts_checked: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    atlasdgd_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def filesystem(uri: str, storage_options: dict | None = None):
    """``(fs, path)`` for a URI (see :func:`atlasdgd.io.uri.filesystem`); errors as StoreError."""
    return _filesystem(uri, storage_options, error=StoreError)


def zarr_store(uri: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr store for a URI: LocalStore for local paths, FsspecStore otherwise."""
    import zarr

    fs, path = filesystem(uri, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(str(uri), storage_options=storage_options, read_only=read_only)


def read_manifest(uri: str, storage_options: dict | None = None) -> StoreManifest:
    fs, path = filesystem(uri, storage_options)
    try:
        exists = fs.exists(path)
    except Exception as e:  # network / permission errors from any fsspec backend
        raise StoreError(f"cannot read {uri!r}: {e}") from e
    if not exists:
        raise StoreError(f"no atlas store at {uri!r}: create one with 'atlasdgd ingest INPUT {uri}'")
    raw = read_versioned(fs, path, STORE_MANIFEST, where=uri)
    known = set(StoreManifest.__dataclass_fields__)
    return StoreManifest(**{k: v for k, v in raw.items() if k in known})


def write_manifest(uri: str, manifest: StoreManifest, storage_options: dict | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.pipe_file(f"{path.rstrip('/')}/{MANIFEST}", manifest.to_json().encode())
