"""The streaming loader: block-shuffled minibatches from a store, per worker shard, prefetched.

Cells are split once into per-worker shards: contiguous, equal (+-1) segments of the sorted cell
rows, fixed for the whole run, so a worker owns its cells' representation rows and never trades
them. Each epoch a worker shuffles the order of its chunks (``chunk_cells`` consecutive shard cells,
read with one contiguous request), then shuffles cells within windows of ``buffer_chunks`` chunks
in memory, and cuts the order into the same number of batches on every worker (DDP needs equal
steps): sizes differ by at most one and no cell is dropped or repeated. Everything is a function of
(seed, epoch, rank). A background thread reads and decodes the next windows while the trainer works; the store is opened inside the worker process (TileDB-SOMA handles cannot cross a fork).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from scipy import sparse

from atlasdgd.model.module import Batch


def shard_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This worker's cells: the ``rank``-th of ``world_size`` contiguous equal segments of sorted ``rows``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return np.array_split(np.sort(np.asarray(rows, dtype=np.int64)), world_size)[rank]


class BlockShufflePlan:
    """Batches of shard positions for an epoch (see the module docstring)."""

    def __init__(self, n_positions: int, batch_size: int, chunk_cells: int = 1024, buffer_chunks: int = 4,
                 seed: int = 0, rank: int = 0, n_steps: int | None = None, shuffle: bool = True):
        if batch_size < 1 or chunk_cells < 1 or buffer_chunks < 1:
            raise ValueError("batch_size, chunk_cells and buffer_chunks must be >= 1")
        self.n, self.batch_size, self.chunk_cells, self.buffer_chunks = n_positions, batch_size, chunk_cells, buffer_chunks
        self.seed, self.rank, self.shuffle = seed, rank, shuffle
        self.n_steps = n_steps if n_steps is not None else -(-n_positions // batch_size)
        if self.n_steps * batch_size < n_positions:
            raise ValueError(f"{self.n_steps} steps of {batch_size} cannot hold {n_positions} cells")

    def order(self, epoch: int) -> np.ndarray:
        pos = np.arange(self.n)
        if not self.shuffle:
            return pos
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        chunks = [pos[i : i + self.chunk_cells] for i in range(0, self.n, self.chunk_cells)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        out = []
        for w in range(0, len(chunks), self.buffer_chunks):
            window = np.concatenate(chunks[w : w + self.buffer_chunks])
            out.append(window[rng.permutation(len(window))])
        return np.concatenate(out) if out else pos

    def batches(self, epoch: int, order: np.ndarray | None = None) -> list[np.ndarray]:
        """``n_steps`` arrays of positions (sorted within each batch), covering every position once."""
        order = self.order(epoch) if order is None else order
        return [np.sort(b) for b in np.array_split(order, self.n_steps)]


class StreamingLoader:
    """Minibatches of one worker's shard of a store (:class:`~atlasdgd.store.cells.StoreCells`).

    ``Batch.index`` is the position in the shard (the row of this worker's representation table);
    ``Batch.cells`` the global cell rows in the store.
    """

    def __init__(self, cells, rows: np.ndarray, batch_size: int = 128, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, chunk_cells: int | None = None, buffer_chunks: int = 4,
                 prefetch: int = 2):
        self.cells = cells
        rows = np.asarray(rows, dtype=np.int64)
        self.rows = shard_rows(rows, rank, world_size)
        largest_shard = math.ceil(len(rows) / world_size)
        n_steps = math.ceil(largest_shard / batch_size)  # every worker takes this many steps
        self.plan = BlockShufflePlan(len(self.rows), batch_size, chunk_cells or cells.chunk_cells, buffer_chunks,
                                     seed, rank, max(n_steps, 1), shuffle)
        self.batch_size, self.prefetch, self.epoch = batch_size, prefetch, 0
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        return self.plan.n_steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _windows(self, order: np.ndarray) -> list[np.ndarray]:
        """Shard positions grouped by read window, in the order the epoch consumes them."""
        span = self.plan.chunk_cells * self.plan.buffer_chunks
        return [order[i : i + span] for i in range(0, len(order), span)]

    def _read(self, positions: np.ndarray) -> tuple[dict[str, sparse.csr_matrix], np.ndarray]:
        """Counts of shard ``positions`` (sorted) per modality; reads each chunk's covering range once."""
        positions = np.sort(positions)
        rows = self.rows[positions]
        out = {}
        for m in self.cells.modalities:
            parts = []
            chunk_of = positions // self.plan.chunk_cells
            for c in np.unique(chunk_of):
                parts.append(self.cells.store.read_rows(m, rows[chunk_of == c]))
            out[m] = sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, self.cells.n_features(m)))
        return out, positions

    def _batches(self, epoch: int, order: np.ndarray, windows_in) -> Iterator[Batch]:
        """Assemble the epoch's batches from windows arriving in order from ``windows_in``."""
        batches = self.plan.batches(epoch, order)
        span = self.plan.chunk_cells * self.plan.buffer_chunks
        window_of = np.empty(len(order), dtype=np.int64)
        window_of[order] = np.arange(len(order)) // span
        loaded: dict[int, tuple[dict[str, sparse.csr_matrix], np.ndarray]] = {}
        next_window = 0
        for positions in batches:
            needed = np.unique(window_of[positions])
            while next_window <= needed.max():
                loaded[next_window] = next(windows_in)
                next_window += 1
            for w in [w for w in loaded if w < needed.min()]:
                del loaded[w]
            yield self._assemble(positions, window_of, loaded)

    def _assemble(self, positions: np.ndarray, window_of: np.ndarray, loaded) -> Batch:
        """Dense counts of the batch's cells, scattered straight from the windows' CSR arrays."""
        windows = window_of[positions]
        counts = {}
        for m in self.cells.modalities:
            out = np.zeros((len(positions), self.cells.n_features(m)), dtype=np.float32)
            for w in np.unique(windows):
                block, pos = loaded[int(w)]
                want = positions[windows == w]
                _scatter_rows(block[m], np.searchsorted(pos, want), out, np.searchsorted(positions, want))
            counts[m] = torch.from_numpy(out)
        return self.cells.batch(torch.from_numpy(positions), self.rows[positions], counts)

    def __iter__(self) -> Iterator[Batch]:
        order = self.plan.order(self.epoch)
        windows = self._windows(order)
        if self.prefetch <= 0:
            yield from self._batches(self.epoch, order, (self._read(w) for w in windows))
            return
        # the reading thread does the I/O and decoding of whole windows (zarr and TileDB release the
        # GIL there); batches are cut from loaded windows here, which is cheap
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for w in windows:
                    if stop.is_set():
                        return
                    q.put(self._read(w))
            except BaseException as e:  # hand errors to the consumer
                q.put(e)

        def consume():
            for _ in windows:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item

        thread = threading.Thread(target=produce, daemon=True, name="atlasdgd-prefetch")
        thread.start()
        try:
            yield from self._batches(self.epoch, order, consume())
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def _scatter_rows(x: sparse.csr_matrix, rows: np.ndarray, out: np.ndarray, out_rows: np.ndarray) -> None:
    """``out[out_rows[i]] = x[rows[i]]`` (dense) without building intermediate sparse matrices."""
    starts, ends = x.indptr[rows], x.indptr[rows + 1]
    lengths = ends - starts
    if lengths.sum() == 0:
        return
    # flat positions of every selected row's non-zeros: its start plus 0..length-1
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    flat = first + np.arange(lengths.sum())
    out[np.repeat(out_rows, lengths), x.indices[flat]] = x.data[flat]
