"""Writing and reading the zarr atlas store (layout in :mod:`atlasdgd.store.format`).

The writer takes cells in blocks (any size) and writes whole shards only, so memory is one shard per
modality plus the block in hand, whatever the number of cells. The reader serves contiguous cell
ranges (the fast path: one contiguous read of ``data``/``indices`` per range); several ranges are
read concurrently. A local store's counts arrays are decoded chunk by chunk by
:mod:`atlasdgd.store.shard_reader` (blosc straight from the shard files); elsewhere (s3, memory) zarr
reads them, with zarrs (zarr's Rust codec pipeline) when it is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from anndata.io import read_elem, write_elem
from zarr.codecs import BloscCodec
from scipy import sparse

from atlasdgd.store.format import (StoreError, StoreManifest, filesystem, read_manifest, with_names, write_manifest,
                                   zarr_store)
from atlasdgd.store.shard_reader import ShardedBloscArray

INDPTR_CHUNK = 1 << 20
# lz4 with byte shuffle decodes ~3x faster than zarr's default zstd for 30% more bytes (measured on
# simulated counts: 8M values + indices read in 0.073 s vs 0.222 s); reading, not storage, is the
# loader's bottleneck
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# non-zeros per zarr chunk of data/indices: a read decodes whole chunks, so a chunk much larger than
# the loader's reads (about 750k non-zeros for 1,024 cells) decodes several times what it needs. A
# window of 4 x 750k non-zeros read in 67 ms with 4M-element chunks, 34 with 1M, 19 with 256k (zarr
# 3.1 default pipeline / zarrs, sequential reads; 65k chunks were slower again), measured on 100k
# simulated cells
CHUNK_NONZEROS = 1 << 18
READ_THREADS = 8  # concurrent range reads: zarr decodes them in parallel (26 -> 10 ms per window with zarrs)
# where a local store's counts are read by atlasdgd's own chunk reader (atlasdgd.store.shard_reader):
# "zarr" reads everything through zarr (a way out should that reader ever misbehave)
READER_ENV = "ATLASDGD_ZARR_READER"
READ_THREAD_PREFIX = "atlasdgd-read"


def _all_integers(values: np.ndarray, block: int = 1 << 16) -> bool:
    """Whether every value is a whole number, checked in cache-sized blocks: one pass with no
    allocation per read (``array_equal(x, round(x))`` on whole reads cost 0.18 s of a 0.95 s epoch)."""
    scratch = np.empty(min(block, len(values)), dtype=values.dtype)
    for start in range(0, len(values), block):
        part = values[start : start + block]
        rounded = np.round(part, out=scratch[: len(part)])
        if not np.array_equal(part, rounded):
            return False
    return True


def fast_codecs():
    """A scoped zarr config that opens arrays with zarrs (Rust codecs, decoding off the GIL on every
    core) when the package is installed; arrays keep the pipeline they were opened with, so code
    outside this block, ours or the user's, sees zarr's own config unchanged. zarrs falls back to
    zarr's pipeline for stores it cannot read itself (memory, fsspec)."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return contextlib.nullcontext()
    return zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def _write_elem(group, key, value) -> None:
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        write_elem(group, key, value)


class _ShardedAppender:
    """Appends to a growing 1-D zarr array, writing only whole shards (and the tail at the end)."""

    def __init__(self, array: zarr.Array):
        self.array, self.shard = array, array.shards[0] if array.shards else array.chunks[0]
        self.written, self.pending, self.n_pending = 0, [], 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= self.shard:
            buf = np.concatenate(self.pending)
            full = (len(buf) // self.shard) * self.shard
            self._write(buf[:full])
            self.pending, self.n_pending = [buf[full:]], len(buf) - full

    def _write(self, values: np.ndarray) -> None:
        end = self.written + len(values)
        if end > self.array.shape[0]:
            self.array.resize((end,))
        self.array[self.written : end] = values
        self.written = end

    def close(self) -> None:
        if self.n_pending:
            self._write(np.concatenate(self.pending))
        self.pending, self.n_pending = [], 0


class StoreWriter:
    """Write a store block by block; :meth:`finish` writes obs, var and the manifest (last).

    ``modalities`` maps each modality to (number of features, expected non-zeros per cell), the
    latter only to size chunks.

    Local targets are written to a temporary sibling and renamed into place at the end; remote ones
    (s3://, memory://) are written in place and become a store only when the manifest lands.
    """

    def __init__(self, uri: str, n_cells: int, modalities: dict[str, tuple[int, float]], *, chunk_cells: int = 4096,
                 shard_chunks: int = 32, overwrite: bool = False, storage_options: dict | None = None):
        self.uri, self.storage_options = str(uri), storage_options
        self.n_cells, self.chunk_cells, self.shard_chunks = n_cells, chunk_cells, shard_chunks
        fs, path = filesystem(self.uri, storage_options)
        self._local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        if fs.exists(path):
            if not overwrite:
                raise StoreError(f"{self.uri!r} already exists: choose another store URI or pass overwrite (--overwrite)")
            if not self._local:
                fs.rm(path, recursive=True)
        if self._local:
            parent = Path(path).parent
            if not parent.exists():
                raise StoreError(f"the folder {str(parent)!r} for the store does not exist: create it first")
            self._final = Path(path)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self._final.name}.tmp-", dir=parent))
            self._target = str(self._tmp)
        else:
            self._target = self.uri
        self.root = zarr.open_group(zarr_store(self._target, storage_options), mode="w", zarr_format=3)
        self.modalities = modalities
        self.indptr = {m: [np.zeros(1, np.int64)] for m in modalities}
        self.offset = dict.fromkeys(modalities, 0)
        self.appenders = {}
        for m, (n_features, nnz_per_cell) in modalities.items():
            g = self.root.require_group(f"mod/{m}")
            g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            x = g.require_group("X")
            x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_features]})
            # chunks of at most CHUNK_NONZEROS (see there), fewer for small stores; shards several chunks
            chunk = int(max(1024, min(CHUNK_NONZEROS, round(max(1.0, nnz_per_cell) * chunk_cells))))
            shard = chunk * shard_chunks
            self.appenders[m] = {
                name: _ShardedAppender(x.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,), shards=(shard,),
                                                      compressors=COMPRESSOR))
                for name, dtype in (("data", np.float32), ("indices", np.int32))
            }
        self.cells_written = dict.fromkeys(modalities, 0)

    def append(self, modality: str, block: sparse.csr_matrix) -> None:
        """Append the next rows of ``modality`` (CSR with the modality's feature count)."""
        block = sparse.csr_matrix(block)
        if not _all_integers(block.data):
            first = self.cells_written[modality]
            raise StoreError(f"modality {modality!r} has non-integer counts in cells {first}-{first + block.shape[0]}: "
                             "an atlas store holds raw counts; ingest raw counts")
        block.sort_indices()
        app = self.appenders[modality]
        app["data"].append(block.data.astype(np.float32, copy=False))
        app["indices"].append(block.indices.astype(np.int32, copy=False))
        self.indptr[modality].append(block.indptr[1:].astype(np.int64) + self.offset[modality])
        self.offset[modality] += int(block.nnz)
        self.cells_written[modality] += block.shape[0]

    def finish(self, obs: pd.DataFrame, var: dict[str, pd.DataFrame], manifest: StoreManifest) -> str:
        for m in self.modalities:
            if self.cells_written[m] != self.n_cells:
                raise StoreError(f"modality {m!r}: wrote {self.cells_written[m]} of {self.n_cells} cells")
            for app in self.appenders[m].values():
                app.close()
            indptr = np.concatenate(self.indptr[m])
            x = self.root[f"mod/{m}/X"]
            arr = x.create_array("indptr", shape=indptr.shape, dtype=np.int64, chunks=(min(INDPTR_CHUNK, len(indptr)),))
            arr[:] = indptr
            g = self.root[f"mod/{m}"]
            _write_elem(g, "obs", pd.DataFrame(index=obs.index.astype(str)))
            _write_elem(g, "var", var[m])
            for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                _write_elem(g, key, {})
        _write_elem(self.root, "obs", obs)
        manifest = dataclasses.replace(manifest, counts_checked=True)  # append checked every block
        write_manifest(self._target, manifest, self.storage_options)  # last: the store is now complete
        if self._local:
            if self._final.exists():
                old = self._final.with_name(f".{self._final.name}.old-{os.getpid()}")
                os.replace(self._final, old)
                os.replace(self._tmp, self._final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self._tmp, self._final)
        return self.uri

    def abort(self) -> None:
        """Remove what was written (a local temporary directory; remote partial output stays without manifest)."""
        if self._local:
            shutil.rmtree(self._tmp, ignore_errors=True)


class ZarrAtlasStore:
    """Read access to a complete store: the cell annotations in memory (by row), cell names and
    counts read when asked."""

    backend = "zarr"

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri, self.storage_options = str(uri), storage_options
        self.manifest = read_manifest(self.uri, storage_options)
        try:
            self.root = zarr.open_group(zarr_store(self.uri, storage_options, read_only=True), mode="r")
            self.annotations = _read_columns(self.root["obs"])
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot read the cell table of {self.uri!r} ({e}): the store is damaged") from e
        if len(self.annotations) != self.manifest.n_cells:
            raise StoreError(f"{self.uri!r}: obs has {len(self.annotations)} cells, the manifest says "
                             f"{self.manifest.n_cells}: the store is damaged")
        self._indptr, self._data, self._indices, self.var = {}, {}, {}, {}
        self._chunk_readers: dict[str, tuple] = {}  # modality -> (data, indices) readers, where they apply
        self._pool = None  # threads for concurrent reads, started on first use
        self._chunk_threads = None  # the same for the chunk reader (see _chunk_pool)
        # a store whose writer checked its counts needs no check per read (~8% of the loader's time
        # on 100k x 2,000, measured); older stores are checked on every read
        self._check_reads = not self.manifest.counts_checked
        for m, info in self.manifest.modalities.items():
            try:
                x = self.root[f"mod/{m}/X"]
                indptr = x["indptr"][:]
                with fast_codecs():
                    self._data[m], self._indices[m] = x["data"], x["indices"]
                readers = tuple(ShardedBloscArray.open(a) for a in (self._data[m], self._indices[m]))
                if all(readers) and os.environ.get(READER_ENV, "").lower() != "zarr":
                    self._chunk_readers[m] = readers
                self.var[m] = read_elem(self.root[f"mod/{m}/var"])
            except KeyError as e:
                raise StoreError(f"{self.uri!r} lacks {e} for modality {m!r}: the store is damaged") from e
            shape = tuple(x.attrs.get("shape", ()))
            if (len(indptr) != self.manifest.n_cells + 1 or shape != (self.manifest.n_cells, info["n_features"])
                    or indptr[-1] != self._data[m].shape[0] or self._data[m].shape != self._indices[m].shape
                    or len(self.var[m]) != info["n_features"]):
                raise StoreError(
                    f"{self.uri!r}: modality {m!r} has mismatched shapes (indptr {len(indptr)}, X {shape}, "
                    f"nnz {indptr[-1]} vs data {self._data[m].shape[0]}, var {len(self.var[m])}; manifest "
                    f"{self.manifest.n_cells} x {info['n_features']}): the store is damaged; ingest it again"
                )
            self._indptr[m] = indptr

    @property
    def obs_names(self) -> pd.Index:
        """The cell names, read from the store on each call. Not held: as Python strings they are
        ~70 B per cell (70 MB for a million cells, in every training worker), and only outputs
        need them."""
        group = self.root["obs"]
        key = group.attrs["_index"]
        return pd.Index(read_elem(group[key]), name=None if key == "_index" else key)  # as anndata names it

    @property
    def obs(self) -> pd.DataFrame:
        """The cell annotations indexed by cell name (names read on each call, see ``obs_names``)."""
        return with_names(self.annotations, self.obs_names)

    @property
    def n_cells(self) -> int:
        return self.manifest.n_cells

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    def n_features(self, modality: str) -> int:
        return int(self.manifest.modalities[modality]["n_features"])

    def read_range(self, modality: str, start: int, stop: int) -> sparse.csr_matrix:
        """Rows ``start:stop`` of a modality as CSR (one contiguous read)."""
        indptr = self._indptr[modality]
        lo, hi = int(indptr[start]), int(indptr[stop])
        data_array, indices_array = self._data[modality], self._indices[modality]
        data, indices = np.empty(hi - lo, dtype=data_array.dtype), np.empty(hi - lo, dtype=indices_array.dtype)
        self._read_ranges(modality, [(lo, hi, data, indices)])
        if self._check_reads and not _all_integers(data):
            raise StoreError(f"{self.uri!r}: modality {modality!r} has non-integer counts in cells {start}-{stop}: "
                             "the store is not a count store; ingest raw counts")
        return sparse.csr_matrix((data, indices, indptr[start : stop + 1] - lo),
                                 shape=(stop - start, self.n_features(modality)))

    def read_row_blocks(self, modality: str, blocks: list[np.ndarray]) -> list[sparse.csr_matrix]:
        """:meth:`read_rows` of several blocks of sorted rows, read concurrently (the loader's window)."""
        if len(blocks) <= 1:
            return [self.read_rows(modality, b) for b in blocks]
        return list(self._read_pool().map(lambda b: self.read_rows(modality, b), blocks))

    def read_window(self, modality: str, blocks: list[np.ndarray], buffer) -> sparse.csr_matrix:
        """The rows of ``blocks`` (each sorted), in order, as one CSR decoded straight into ``buffer``
        (a :class:`~atlasdgd.data.window.WindowBuffer`; the result is a view of it). Each block of
        consecutive rows is one contiguous range of ``data`` and ``indices``, and the ranges are
        decoded concurrently, each into its place: no per-range arrays, no join (blocks that are not
        consecutive rows take :meth:`read_rows` and a copy)."""
        from atlasdgd.data.window import csr, index_dtype_for

        blocks = [np.asarray(b, dtype=np.int64) for b in blocks]
        if not all(len(b) and int(b[-1]) - int(b[0]) + 1 == len(b) for b in blocks):
            return buffer.join(self.read_row_blocks(modality, blocks))
        indptr = self._indptr[modality]
        firsts = np.array([int(b[0]) for b in blocks], dtype=np.int64)
        lasts = np.array([int(b[-1]) + 1 for b in blocks], dtype=np.int64)
        lo, hi = indptr[firsts], indptr[lasts]
        sizes = hi - lo
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        data_array, indices_array = self._data[modality], self._indices[modality]
        data, indices = buffer.arrays(int(offsets[-1]), data_array.dtype, indices_array.dtype)
        self._read_ranges(modality, [(int(a), int(b), data[int(o) : int(o) + int(b - a)],
                                      indices[int(o) : int(o) + int(b - a)])
                                     for a, b, o in zip(lo, hi, offsets[:-1]) if b > a])
        if self._check_reads and not _all_integers(data):
            raise StoreError(f"{self.uri!r}: modality {modality!r} has non-integer counts in cells {firsts.min()}-"
                             f"{lasts.max()}: the store is not a count store; ingest raw counts")
        row_pointers = np.empty(int((lasts - firsts).sum()) + 1, dtype=index_dtype_for(int(offsets[-1])))
        row_pointers[0], row = 0, 0
        for first, last, a, o in zip(firsts, lasts, lo, offsets[:-1]):
            n = int(last - first)
            row_pointers[row + 1 : row + n + 1] = indptr[first + 1 : last + 1] - (a - o)
            row += n
        return csr(data, indices, row_pointers, self.n_features(modality))

    def _read_ranges(self, modality: str, ranges: list[tuple[int, int, np.ndarray, np.ndarray]]) -> None:
        """Decode non-zeros ``[lo, hi)`` of ``data`` and ``indices`` into the given arrays, for each
        ``(lo, hi, data_out, indices_out)``, concurrently: by chunk with atlasdgd's own reader where
        it applies (a local store as atlasdgd writes it), else by range through zarr."""
        readers = self._chunk_readers.get(modality)
        if readers is not None:
            data_reader, indices_reader = readers
            tasks = [(reader, task) for lo, hi, data, indices in ranges
                     for reader, out in ((data_reader, data), (indices_reader, indices))
                     for task in reader.tasks(lo, hi, out)]
            run = lambda t: t[0].run(t[1])  # noqa: E731
        else:
            tasks = [(array, lo, hi, out) for lo, hi, data, indices in ranges
                     for array, out in ((self._data[modality], data), (self._indices[modality], indices))]
            run = lambda t: _read_into(*t)  # noqa: E731
        # a read already on the read pool's threads (read_row_blocks) reads in place: its reads queued
        # behind it on the same threads would never start once every thread waits so
        nested = readers is None and threading.current_thread().name.startswith(READ_THREAD_PREFIX)
        if len(tasks) > 1 and not nested:
            pool = self._read_pool() if readers is None else self._chunk_pool()
            list(pool.map(run, tasks))
        else:
            for task in tasks:
                run(task)

    def _chunk_pool(self):
        """Threads for the chunk reader's tasks: one per usable core. Its decoding holds no GIL, so
        more threads only add scratch memory (2 MiB each): on 2 cores, 2 threads decoded 362k cells/s
        against 322k with 8, the loader 157k against 147k (medians of 6 alternating epochs)."""
        if self._chunk_threads is None:
            from concurrent.futures import ThreadPoolExecutor

            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self._chunk_threads = ThreadPoolExecutor(max(1, min(READ_THREADS, cores)), thread_name_prefix="atlasdgd-chunk")
        return self._chunk_threads

    def _read_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix=READ_THREAD_PREFIX)
        return self._pool

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        """Sorted rows as CSR. Dense selections read their covering range once; scattered ones
        (validation cells, samples) are read block by block, so memory stays at one block."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sparse.csr_matrix((0, self.n_features(modality)), dtype=np.float32)
        first, last = int(rows[0]), int(rows[-1]) + 1
        if last - first == len(rows):  # a whole range (the loader's chunks): no row selection to copy
            return self.read_range(modality, first, last)
        if last - first <= max(2 * len(rows), self.manifest.chunk_cells):
            return self.read_range(modality, first, last)[rows - first]
        block = rows // self.manifest.chunk_cells
        parts = []
        for b in np.unique(block):
            sel = rows[block == b]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            parts.append(self.read_range(modality, lo, hi)[sel - lo])
        return sparse.vstack(parts, format="csr")


def _read_into(array, start: int, stop: int, out: np.ndarray) -> None:
    """``out[:] = array[start:stop]``, decoded by zarr straight into ``out`` (no array of its own)."""
    from zarr.core.buffer import default_buffer_prototype

    array.get_basic_selection(slice(start, stop), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))


def _read_columns(group) -> pd.DataFrame:
    """An AnnData-encoded dataframe's columns indexed by row, without its index (the cell names,
    see ``ZarrAtlasStore.obs_names``): anndata's ``read_elem`` reads them column by column too."""
    columns = list(group.attrs.get("column-order", []))
    n = group[group.attrs["_index"]].shape[0]
    return pd.DataFrame({c: read_elem(group[c]) for c in columns}, index=pd.RangeIndex(n), columns=columns)
