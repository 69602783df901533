"""Ranges of the count arrays that atlasdgd writes, decoded by blosc straight from the shard files.

Why not zarr: a loader window is a few ranges of ~1,000 cells (~765k values, three 1 MiB chunks),
and each ``get_basic_selection`` goes through zarr's async machinery. Measured on the 100k x 2,000
store (2 cores): zarr with zarrs decoded such ranges at 0.65-1.6 GiB/s where blosc alone decodes
~3.9 GiB/s on two threads; decoding a training epoch's windows went from 251k to 358k cells/s
(medians of 6 alternating epochs; ~6.5 -> ~4.5 CPU us per cell). It reads only what
:class:`~atlasdgd.store.zarr_store.StoreWriter` writes: 1-D arrays in a local directory, sharded,
each chunk ``bytes`` (little-endian) then ``blosc``, the shard index at the end with a crc32c. Any
other array (a remote store, other codecs) returns None from :meth:`ShardedBloscArray.open` and is
read by zarr.

A chunk is decompressed straight into the caller's array when the range covers it whole; the
(at most two) partial chunks of a range go through a scratch chunk. Each reading thread keeps one
scratch chunk and one buffer of compressed bytes (2 MiB at 256k values), so a read allocates nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np

_MISSING = np.iinfo(np.uint64).max  # a shard index's offset and size of a chunk never written


class ShardedBloscArray:
    """One 1-D sharded blosc array of a local store, read by chunk (see the module docstring)."""

    def __init__(self, directory: Path, n: int, dtype: np.dtype, shard: int, chunk: int, fill_value):
        self.directory, self.n, self.dtype = directory, n, np.dtype(dtype)
        self.shard, self.chunk, self.fill_value = shard, chunk, fill_value
        self.chunks_per_shard = shard // chunk
        self._index: dict[int, np.ndarray] = {}  # shard -> its chunks' (offset, size), read once
        # each reading thread's reused buffers (a chunk for partial chunks, its compressed bytes): a
        # fresh 1 MiB array per chunk is fresh pages to fault in every time
        self._scratch = threading.local()

    @classmethod
    def open(cls, array) -> ShardedBloscArray | None:
        """The reader for a zarr array, or None where this reader does not apply."""
        try:
            from zarr.storage import LocalStore

            store, path = array.store_path.store, array.store_path.path
            meta = array.metadata.to_dict()
            # blosc hands back the stored (little-endian) bytes as they are: native arrays only there
            if (not hasattr(os, "pread") or sys.byteorder != "little" or not isinstance(store, LocalStore)
                    or meta.get("zarr_format") != 3 or len(meta["shape"]) != 1):
                return None
            grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
            (codec,) = meta["codecs"]
            inner = codec["configuration"]
            names = [c["name"] for c in inner["codecs"]]
            index_names = [c["name"] for c in inner["index_codecs"]]
            if (codec["name"] != "sharding_indexed" or names != ["bytes", "blosc"] or index_names != ["bytes", "crc32c"]
                    or inner["index_location"] != "end" or grid["name"] != "regular"
                    or keys != {"name": "default", "configuration": {"separator": "/"}}
                    or inner["codecs"][0].get("configuration", {}).get("endian", "little") != "little"):
                return None
            dtype = np.dtype(str(array.dtype))
            shard, chunk = int(grid["configuration"]["chunk_shape"][0]), int(inner["chunk_shape"][0])
            if shard % chunk:
                return None
            return cls(Path(store.root) / path, int(meta["shape"][0]), dtype, shard, chunk, meta["fill_value"])
        except (AttributeError, KeyError, TypeError, ValueError, ImportError):
            return None

    def tasks(self, start: int, stop: int, out: np.ndarray) -> list[tuple]:
        """The chunk reads that fill ``out`` with values ``[start, stop)``; run each with :meth:`run`
        (in any order, on any thread)."""
        if not 0 <= start <= stop <= self.n or len(out) != stop - start:
            raise ValueError(f"range [{start}, {stop}) of an array of {self.n} into {len(out)} values")
        if start == stop:
            return []
        first, last = start // self.chunk, (stop - 1) // self.chunk
        return [(c, max(start, c * self.chunk), min(stop, (c + 1) * self.chunk), start, out)
                for c in range(first, last + 1)]

    def run(self, task: tuple) -> None:
        """Decode one chunk into its part of the output (blosc releases the GIL while it decodes)."""
        import numcodecs.blosc as blosc

        c, lo, hi, start, out = task
        target = out[lo - start : hi - start]
        shard, k = divmod(c, self.chunks_per_shard)
        index = self._shard_index(shard)
        if index is None or tuple(index[k]) == (_MISSING, _MISSING):  # never written: the fill value
            target[...] = self.fill_value
            return
        offset, size = int(index[k, 0]), int(index[k, 1])
        raw = self._read_chunk(self._path(shard), size, offset)
        if hi - lo == self.chunk:
            blosc.decompress(raw, target)
        else:
            whole = getattr(self._scratch, "chunk", None)
            if whole is None:
                whole = self._scratch.chunk = np.empty(self.chunk, dtype=self.dtype)
            blosc.decompress(raw, whole)
            base = c * self.chunk
            target[...] = whole[lo - base : hi - base]

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        for task in self.tasks(start, stop, out):
            self.run(task)

    def _read_chunk(self, path: Path, size: int, offset: int):
        """A chunk's compressed bytes, read into this thread's reused buffer where the platform
        reads into a given buffer (``preadv``): no new object per chunk."""
        if not hasattr(os, "preadv"):
            raw = _pread(path, size, offset)
        else:
            buffer = getattr(self._scratch, "compressed", None)
            if buffer is None or len(buffer) < size:
                buffer = self._scratch.compressed = bytearray(max(size, self.chunk * self.dtype.itemsize + 64))
            raw = memoryview(buffer)[:size]
            fd = os.open(path, os.O_RDONLY)
            try:
                raw = raw[: os.preadv(fd, [raw], offset)]
            finally:
                os.close(fd)
        if len(raw) != size:
            raise OSError(f"{path}: the shard is shorter than its index says; ingest the store again")
        return raw

    def _path(self, shard: int) -> Path:
        return self.directory / "c" / str(shard)

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """``[chunks, 2]`` (offset, size) of the shard's chunks, read once and checked; None for a
        shard never written (every chunk the fill value)."""
        if shard in self._index:
            return self._index[shard]
        from numcodecs import CRC32C

        path, nbytes = self._path(shard), self.chunks_per_shard * 16
        try:
            end = os.stat(path).st_size
        except FileNotFoundError:
            index = None
        else:
            raw = _pread(path, nbytes + 4, end - nbytes - 4) if end >= nbytes + 4 else b""
            if len(raw) != nbytes + 4 or bytes(CRC32C(location="end").encode(raw[:-4])[-4:]) != raw[-4:]:
                raise OSError(f"{path}: the shard's index is damaged (checksum); ingest the store again")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2)
        self._index[shard] = index  # (threads racing here store equal values)
        return index


def _pread(path: Path, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``; the file is opened per read, so no descriptors stay open (a
    store of millions of cells has thousands of shards; an open costs microseconds against the
    ~0.3 ms of decoding a chunk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
