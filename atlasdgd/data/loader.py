"""The one minibatch loader, for every cell source (in memory, zarr store, TileDB-SOMA, query data).

Batches follow a :class:`~atlasdgd.data.plan.BlockShufflePlan` over this worker's shard: windows of
consecutive cells are read with one request each (a store decodes whole chunks; an in-memory source
slices its CSR) into a few reused buffers (:mod:`atlasdgd.data.window`; a zarr store decodes
straight into them), and each batch is scattered from the windows' CSR arrays into one dense block.
A background thread reads the next windows and assembles their batches while the trainer works
(zarr, zarrs and TileDB release the GIL while decoding). A source held in memory (``resident``) has nothing to stage: each batch's rows are read
straight into the dense block (the thread and windows only cost time there: 3x, measured). ``Batch.index`` is the position in the shard (the row of this worker's representation
table), ``Batch.cells`` the global cell row in the source. With a CUDA ``device`` the dense counts
are assembled in pinned memory and every batch is moved with one non-blocking copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from atlasdgd.data.count_summary import summarize_counts
from atlasdgd.data.plan import BlockShufflePlan, shard_rows, steps_per_epoch
from atlasdgd.data.row_gather import gather_dense
from atlasdgd.data.window import WindowBuffer
from atlasdgd.model.module import Batch
from atlasdgd.runtime.malloc import TrimWhenGrown, release_free_memory

DEFAULT_BLOCK_CELLS = 1024  # cells per contiguous read of a source that does not set its own
# cells of finished batches queued per unit of ``prefetch`` (8 batches of 128): counted in cells, not
# batches, because the held-out mapping's candidate search reads ~500-cell batches, and 16 of those
# queued (with their non-zeros) raised training's peak by 260 MiB at 200k cells (measured)
CELLS_PER_PREFETCH = 1024
# chunks read and shuffled together when shuffling; a loader that reads in order needs no window to
# shuffle in, so it holds one chunk
SHUFFLE_BUFFER_CHUNKS = 4


class CellLoader:
    """Minibatches of ``rows`` of ``source`` (a :class:`~atlasdgd.data.source.CellSource`).

    With ``world_size > 1`` the loader keeps worker ``rank``'s shard of ``rows`` and takes as many
    steps as the largest shard needs (every worker the same, as DDP requires). ``count_summaries``:
    batches carry their non-zeros summarised for a training step
    (:class:`~atlasdgd.model.nb.CountSummary`; ~0.3 ms per batch of 128 x 2,000) instead of the
    non-zeros themselves, which only that step would read.
    """

    def __init__(self, source, rows: np.ndarray, batch_size: int = 128, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, chunk_cells: int | None = None, buffer_chunks: int | None = None,
                 prefetch: int = 2, device: torch.device | str | None = None, count_summaries: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        rows = np.asarray(rows, dtype=np.int64)
        self.rows = shard_rows(rows, rank, world_size)
        # a source in memory has no read blocks: its cells are shuffled freely (chunks of one cell)
        # unless it says otherwise; a store's chunks are its contiguous reads
        self.resident = bool(getattr(source, "resident", False))
        chunk = chunk_cells or getattr(source, "chunk_cells", None) or (1 if self.resident else DEFAULT_BLOCK_CELLS)
        if buffer_chunks is None:
            buffer_chunks = SHUFFLE_BUFFER_CHUNKS if shuffle else 1
        self.plan = BlockShufflePlan(len(self.rows), batch_size, chunk, buffer_chunks, seed, rank,
                                     steps_per_epoch(len(rows), batch_size, world_size), shuffle)
        self.batch_size, self.prefetch, self.epoch = batch_size, prefetch, 0
        self.shuffle, self.seed = shuffle, seed
        self.device = None if device is None else torch.device(device)
        self.count_summaries = count_summaries
        self._pin = self.device is not None and self.device.type == "cuda"
        self.modalities = list(source.modalities)
        self._n_features = {m: int(source.n_features(m)) for m in self.modalities}
        # per-cell annotations of this loader's rows only, by shard position (a copy of the source's
        # whole columns per loader grew with the atlas, not with the shard)
        self._library = {m: np.asarray(source.library(m), dtype=np.float32)[self.rows] for m in self.modalities}
        self._covariates = source.covariate_codes()[self.rows]
        self._observed = {m: np.asarray(source.observed[m], dtype=bool)[self.rows] for m in self.modalities}
        self._all_observed = all(o.all() for o in self._observed.values())
        # query data measuring only some of the model's features (see atlasdgd.infer.query)
        subsets = source.feature_subsets() if hasattr(source, "feature_subsets") else None
        self._features = None if not subsets else {m: torch.as_tensor(np.asarray(i, dtype=np.int64))
                                                   for m, i in subsets.items()}
        if self._features is not None and self.device is not None:
            self._features = {m: i.to(self.device) for m, i in self._features.items()}

    def __len__(self) -> int:
        return self.plan.n_steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- reading -----------------------------------------------------------------------------
    def _read(self, positions: np.ndarray, buffers: dict[str, WindowBuffer]) -> tuple[dict, np.ndarray, dict]:
        """Counts of shard ``positions`` as one block per modality, in ``buffers``: (modality -> CSR of
        the sorted positions' rows, sorted positions, the buffers). One request per chunk, all chunks
        of a window at once where the source reads concurrently, into one CSR so a batch is filled
        with one call per window instead of one per chunk."""
        positions = np.sort(positions)
        rows = self.rows[positions]
        chunk_of = positions // self.plan.chunk_cells
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        pieces = np.split(rows, bounds)
        blocks = {}
        for m in self.modalities:
            if hasattr(self.source, "read_window"):  # stores: decoded into the buffer, concurrently where they can
                blocks[m] = self.source.read_window(m, pieces, buffers[m])
            else:
                blocks[m] = buffers[m].join([self.source.read_rows(m, p) for p in pieces])
        return blocks, positions, buffers

    def _windows(self, windows: list[np.ndarray], free: list[dict]) -> Iterator[tuple[dict, np.ndarray, dict]]:
        """Each window read in turn into buffers from ``free`` (those of windows no batch needs any
        more), new ones only while there are none: the epoch reuses a few windows' memory instead of
        allocating (and faulting in) every window afresh (see :mod:`atlasdgd.data.window`). The
        batches' own arrays still leave freed blocks between live ones: a shuffling (training) loader
        hands them back when the process has grown by 16 MiB since it last did
        (:class:`~atlasdgd.runtime.malloc.TrimWhenGrown`; trimming every window cost ~30% of its
        speed), one reading in order (validation, mapping: compute-bound) before every window (trimming
        those only when grown too, training 200k cells peaked ~30 MiB higher: medians of three runs)."""
        trim = TrimWhenGrown() if self.shuffle else release_free_memory
        for positions in windows:
            trim()
            yield self._read(positions, free.pop() if free else {m: WindowBuffer() for m in self.modalities})

    # -- one batch ---------------------------------------------------------------------------
    def batch(self, positions: np.ndarray) -> Batch:
        """The batch of shard ``positions`` read directly (tests and one-off evaluations)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        if self.resident:
            return self._assemble_resident(positions)
        counts, pieces = self._empty_batch(len(positions))
        self._fill_from(self._read(positions, {m: WindowBuffer() for m in self.modalities}), positions, positions,
                        counts, pieces)
        return self._finish(positions, counts, {m: _merged_entries(p) for m, p in pieces.items()})

    def _empty_batch(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
        """Dense count blocks for ``n`` cells (unwritten: every row is written by exactly one
        ``_fill_rows`` call, which zeroes it first) and empty lists for their non-zero pieces."""
        counts = {m: torch.empty((n, self._n_features[m]), dtype=torch.float32, pin_memory=self._pin)
                  for m in self.modalities}
        return counts, {m: [] for m in self.modalities}

    def _fill_from(self, window: tuple, positions: np.ndarray, want: np.ndarray, counts: dict, pieces: dict) -> None:
        """Scatter the rows of sorted shard positions ``want`` (a subset of the batch's sorted
        ``positions``) from a loaded ``window`` into the batch's dense ``counts``; their non-zeros
        (copies: the window's buffers may take the next window before the batch is finished) are
        appended to ``pieces``."""
        blocks, pos, _ = window
        source_rows, batch_rows = np.searchsorted(pos, want), np.searchsorted(positions, want)
        for m in self.modalities:
            pieces[m].append(_fill_rows(blocks[m], source_rows, counts[m].numpy(), batch_rows))

    def _assemble_resident(self, positions: np.ndarray) -> Batch:
        """The Batch of sorted shard ``positions`` of a source held in memory: its rows are read
        straight into the dense block (no windows to stage)."""
        cells = self.rows[positions]
        counts, _ = self._empty_batch(len(positions))
        every = np.arange(len(cells))
        # a resident source's ``counts`` are whole CSR matrices: rows copied from them straight into the batch
        nonzeros = {m: _merged_entries([_fill_rows(self.source.counts[m], cells, counts[m].numpy(), every)])
                    for m in self.modalities}
        return self._finish(positions, counts, nonzeros)

    def _finish(self, positions: np.ndarray, counts: dict[str, torch.Tensor], entries: dict | None = None) -> Batch:
        """The one Batch builder: counts plus the cells' libraries, covariates and masks, on the device;
        ``entries``: modality -> the non-zeros ``(row, column, value)`` of ``counts`` in row order, handed
        to the likelihood as they are and summarised for the training loss."""
        cells = self.rows[positions]
        observed = None
        if not self._all_observed:
            observed = {m: torch.from_numpy(o[positions]) for m, o in self._observed.items()}
        nonzeros, summaries = {}, {}
        for m, (r, c, v) in (entries or {}).items():
            if not self.count_summaries or self._features is not None:  # (query data measuring some features: no training)
                nonzeros[m] = tuple(torch.from_numpy(a) for a in (r, c, v))
                continue
            if not self._all_observed:  # cells without the modality add nothing to its likelihood
                keep = self._observed[m][positions][r]
                c, v = c[keep], v[keep]
            # the summary stands in for the non-zeros, which the step would not read: they are not
            # queued (~1.1 MB a batch of 128 x 2,000) nor, on a GPU, copied
            summaries[m] = summarize_counts(c, v, self._n_features[m])
        batch = Batch(
            index=torch.from_numpy(positions),
            counts=counts,
            library={m: torch.from_numpy(lib[positions]) for m, lib in self._library.items()},
            covariates=torch.from_numpy(self._covariates[positions]),
            observed=observed,
            features=self._features,
            cells=torch.from_numpy(cells),
            nonzeros=nonzeros or None,
            count_summaries=summaries or None,
        )
        return batch if self.device is None else batch.to(self.device)

    # -- an epoch ----------------------------------------------------------------------------
    def _batches(self, order: np.ndarray, window_of: np.ndarray, windows_in, free: list[dict]) -> Iterator[Batch]:
        """Assemble the epoch's batches from windows arriving in order from ``windows_in``
        (``window_of``: each position's window). A batch that spans two windows is filled from the
        first, whose buffers then go to ``free`` (no later batch reads it) and take the second: one
        window in memory at a time, not two at every boundary (a window of 16k cells x 2,000 genes
        is ~29 MiB: at 200k cells the training epoch's live heap fell by that much, measured)."""
        window, current = None, -1  # the one loaded window and its number
        for positions in self.plan.batches(self.epoch, order):
            if len(positions) == 0:  # a shard smaller than the steps every worker takes
                yield self._finish(positions, {m: torch.zeros((0, self._n_features[m])) for m in self.modalities})
                continue
            counts, pieces = self._empty_batch(len(positions))
            windows = window_of[positions]
            for w in np.unique(windows):  # ascending: the epoch reads its windows in order
                while current < w:
                    if window is not None:
                        free.append(window[2])
                    window, current = next(windows_in), current + 1
                self._fill_from(window, positions, positions[windows == w], counts, pieces)
            yield self._finish(positions, counts, {m: _merged_entries(p) for m, p in pieces.items()})

    def __iter__(self) -> Iterator[Batch]:
        order, starts = self.plan.order_windows(self.epoch)
        if self.resident:  # blocks already in RAM: nothing to read ahead
            for positions in self.plan.batches(self.epoch, order):
                yield self._assemble_resident(positions)
            return
        windows = np.split(order, starts[1:])
        window_of = np.empty(len(order), dtype=np.int64)
        window_of[order] = np.repeat(np.arange(len(windows)), [len(w) for w in windows])
        free: list[dict] = []  # this epoch's window buffers not in use
        batches = self._batches(order, window_of, self._windows(windows, free), free)
        if self.prefetch <= 0:
            yield from batches
            return
        # the whole pipeline (reading windows and assembling batches) runs in one background thread, so
        # the trainer only takes finished batches and its steps hide the reading. For the loader alone
        # the thread is still slower than none (35-69k vs 69-108k cells/s on 100k x 2,000, measured; the
        # GIL hand-offs are the suspect), as it was with reading in the thread and assembly here
        q: queue.Queue = queue.Queue(maxsize=max(2, max(1, self.prefetch) * CELLS_PER_PREFETCH // self.batch_size))
        stop = threading.Event()
        done = object()

        def produce():
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(b)
                q.put(done)
            except BaseException as e:  # hand errors to the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="atlasdgd-prefetch")
        thread.start()
        try:
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def _contiguous(idx: np.ndarray) -> bool:
    return len(idx) > 0 and int(idx[-1]) - int(idx[0]) + 1 == len(idx) and bool(np.all(np.diff(idx) == 1))


def _fill_rows(x, rows: np.ndarray, out: np.ndarray, out_rows: np.ndarray):
    """``out[out_rows[i]] = x[rows[i]]`` (dense, zeros included) for CSR ``x``; returns the written
    entries as ``(out row, column, value)`` arrays (the likelihood's non-zeros, no search over the dense
    block; copies: ``x`` may be a window whose buffers the next window reuses). A batch's cells of one
    chunk land in consecutive output rows (positions are sorted and a chunk is a range of positions):
    for scipy blocks these go through scipy's C++ row copy and densification straight into the output
    (:func:`~atlasdgd.data.row_gather.gather_dense`; 3-4x faster than numpy fancy indexing, measured on
    50k x 2,000 in memory); anything else is scattered in numpy."""
    if hasattr(x, "toarray") and x.dtype == out.dtype and _contiguous(out_rows):
        first = int(out_rows[0])
        indptr, cols, values = gather_dense(x, rows, out[first : int(out_rows[-1]) + 1])
        lengths = np.diff(indptr)
        return np.repeat(np.arange(first, first + len(lengths), dtype=np.int32), lengths), cols, values
    out[out_rows] = 0
    return _scatter_rows(x, rows, out, out_rows)


def _merged_entries(pieces: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``(rows, cols, values)`` triple (int32, int32, float32) from the pieces of a batch, in row
    order, so the likelihood sums in the same order whatever the source and its chunking. Each piece
    is in row order, but the pieces of a batch that spans two windows interleave (a window is a set of
    shuffled chunks): those are merged with a stable sort."""
    pieces = [p for p in pieces if len(p[0])] or pieces[:1]
    if len(pieces) == 1:
        r, c, v = pieces[0]
    else:
        r, c, v = (np.concatenate([p[i] for p in pieces]) for i in range(3))
        if np.any(r[1:] < r[:-1]):
            order = np.argsort(r, kind="stable")
            r, c, v = r[order], c[order], v[order]
    # int32 (a batch's rows and a modality's columns fit): 12 instead of 20 bytes per non-zero in every
    # queued batch, and the store's int32 column indices go in without a conversion
    return np.asarray(r, dtype=np.int32), np.asarray(c, dtype=np.int32), np.asarray(v, dtype=np.float32)


def _scatter_rows(x, rows: np.ndarray, out: np.ndarray, out_rows: np.ndarray):
    """``out[out_rows[i]] = x[rows[i]]`` (dense, C-contiguous ``out``) for a CSR ``x`` (anything with
    indptr, indices and data), without building intermediate sparse matrices; returns the written
    entries as ``(out row, column, value)`` arrays.

    Hand-written rather than scipy's row indexing + toarray so the core loader needs no scipy; one
    flat (1-D) fancy assignment is ~5x faster than numpy's 2-D ``out[r, c] = v`` here (measured).
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = x.indptr[rows]
    lengths = x.indptr[rows + 1] - starts
    total = int(lengths.sum())
    out_rows = np.asarray(out_rows, dtype=np.int64)
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    if len(rows) > 1 and np.all(rows[1:] == rows[:-1] + 1):  # consecutive rows: one contiguous slice
        flat = np.arange(starts[0], starts[0] + total)
    else:  # flat positions of every selected row's non-zeros: its start plus 0..length-1
        flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    row_of = np.repeat(out_rows, lengths)
    cols, values = x.indices[flat], x.data[flat]
    out.reshape(-1)[row_of * out.shape[1] + cols] = values
    return row_of, cols, values
