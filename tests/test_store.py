"""Atlas stores: ingest round trips, torn stores, the streaming loader, SOMA, S3, training from a store."""

import json
import signal
import subprocess
import sys
import time

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
import zarr

from atlasdgd.cli import main
from atlasdgd.data.adapters import prepare, read_input
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.simulate import SimulationConfig, simulate, write_simulation, write_simulation_store
from atlasdgd.store.cells import open_store
from atlasdgd.store.format import MANIFEST, StoreError
from atlasdgd.store.ingest import ingest
from atlasdgd.store.zarr_store import StoreWriter
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer


@pytest.fixture(scope="module")
def h5mu(tmp_path_factory):
    """A MuData file where 50 cells lack ATAC (obsmap 0), written by mudata itself."""
    data = simulate(SimulationConfig(n_cells=1500, n_types=4, n_batches=3, n_genes=120, n_peaks=300, seed=5))
    atac = data["atac"][50:].copy()
    md = mudata.MuData({"rna": data["rna"].copy(), "atac": atac})
    md.obs["cell_type"] = data.obs["cell_type"].to_numpy()
    md.obs["batch"] = data.obs["batch"].to_numpy()
    path = tmp_path_factory.mktemp("store_input") / "atlas.h5mu"
    md.write_h5mu(path)
    return path


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


@pytest.mark.parametrize("order", ["input", "shuffle", None])
def test_ingest_round_trip_is_exact_for_every_modality_and_obs_column(h5mu, tmp_path, order):
    # None: the default, [train | validation | test] each shuffled
    uri = tmp_path / "atlas.zarr"
    ingest(str(h5mu), str(uri), label_key="cell_type", covariate_keys=["batch"], order=order, chunk_cells=256,
           progress=False)
    cells = open_store(str(uri))
    md = read_input(h5mu)
    expected = prepare(md, label_key="cell_type", covariate_keys=["batch"])
    store_order = pd.Index(expected.obs_names).get_indexer(cells.obs_names)
    assert (store_order >= 0).all() and len(store_order) == md.n_obs
    assert (order != "input") == (not np.array_equal(store_order, np.arange(md.n_obs)))
    if order is None:  # the held-out cells are contiguous ranges after the training cells
        ranks = cells.obs["dgd_split"].astype(str).map({"train": 0, "validation": 1, "test": 2}).to_numpy()
        assert (np.diff(ranks) >= 0).all() and set(ranks) == {0, 1, 2}
    for m in ("rna", "atac"):
        got = cells.store.read_range(m, 0, cells.n_cells)
        np.testing.assert_array_equal(got.toarray(), expected.counts[m][store_order].toarray())
        np.testing.assert_array_equal(cells.library(m), expected.library(m)[store_order])
        np.testing.assert_array_equal(cells.observed[m], expected.observed[m][store_order])
        # anndata opens the modality group on its own
        adata = ad.read_zarr(uri / "mod" / m)
        np.testing.assert_array_equal(_dense(adata.X), got.toarray())
        assert list(adata.var_names) == list(expected.feature_names[m])
        np.testing.assert_array_equal(adata.var["n_cells_detected"], (got > 0).sum(0).A1)
    assert cells.observed["atac"].sum() == md.n_obs - 50
    for col in ("cell_type", "batch"):
        assert list(cells.obs[col].astype(str)) == list(md.obs[col].astype(str).iloc[store_order])
    assert list(cells.obs["dgd_split"].astype(str)) == list(expected.obs["dgd_split"].astype(str).iloc[store_order])


def test_store_cells_keep_annotations_by_row_and_read_cell_names_when_asked(h5mu, tmp_path):
    """Training from a store holds no cell names (~70 B per cell as Python strings); ``obs`` and
    ``obs_names`` read them from the store and match what anndata reads."""
    from anndata.io import read_elem
    import zarr

    uri = tmp_path / "atlas.zarr"
    ingest(str(h5mu), str(uri), label_key="cell_type", covariate_keys=["batch"], shuffle=True, progress=False)
    cells = open_store(str(uri))
    assert isinstance(cells.annotations.index, pd.RangeIndex) and len(cells.annotations) == cells.n_cells
    assert isinstance(cells.store.annotations.index, pd.RangeIndex)
    expected = read_elem(zarr.open_group(str(uri / "obs"), mode="r"))
    pd.testing.assert_frame_equal(cells.obs, expected)
    assert cells.obs_names.equals(ad.read_zarr(uri / "mod" / "rna").obs_names)
    # the accessors read the same rows as the named table
    np.testing.assert_array_equal(cells.label_codes(), expected["cell_type"].cat.codes.to_numpy())
    np.testing.assert_array_equal(cells.split_rows("test"), np.flatnonzero(expected["dgd_split"] == "test"))


def test_split_order_stores_train_validation_test_as_shuffled_ranges(h5mu, tmp_path):
    uri = tmp_path / "atlas.zarr"
    assert main(["ingest", str(h5mu), str(uri), "--label-key", "cell_type", "--covariate-key", "batch",
                 "--order", "split", "--chunk-cells", "128", "--quiet"]) == 0
    cells = open_store(str(uri))
    expected = prepare(read_input(h5mu), label_key="cell_type", covariate_keys=["batch"])
    split = cells.obs["dgd_split"].astype(str).to_numpy()
    sizes = [int((split == s).sum()) for s in ("train", "validation", "test")]
    assert sum(sizes) == cells.n_cells and min(sizes) > 0
    # contiguous ranges, in this order
    np.testing.assert_array_equal(split, np.repeat(["train", "validation", "test"], sizes))
    order = pd.Index(expected.obs_names).get_indexer(cells.obs_names)
    for s, (lo, hi) in zip(("train", "validation", "test"), [(0, sizes[0]), (sizes[0], sizes[0] + sizes[1]),
                                                              (sizes[0] + sizes[1], cells.n_cells)]):
        np.testing.assert_array_equal(cells.split_rows(s), np.arange(lo, hi))
        within = order[lo:hi]
        assert not np.all(np.diff(within) > 0)  # shuffled within the split
        assert set(expected.obs["dgd_split"].astype(str).iloc[within]) == {s}  # the same split as in memory
    for m in ("rna", "atac"):
        np.testing.assert_array_equal(cells.store.read_range(m, 0, cells.n_cells).toarray(),
                                      expected.counts[m][order].toarray())
    assert main(["ingest", str(h5mu), str(tmp_path / "b.zarr"), "--order", "split", "--shuffle", "--quiet"]) == 2
    assert main(["ingest", str(h5mu), f"soma://{tmp_path / 'b.soma'}", "--order", "split", "--shuffle", "--quiet"]) == 2
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.soma").exists()


def test_feature_filter_keeps_features_detected_in_enough_cells(h5mu, tmp_path):
    uri = tmp_path / "filtered.zarr"
    ingest(str(h5mu), str(uri), min_cells_fraction=0.2, order="input", progress=False)
    cells = open_store(str(uri))
    md = read_input(h5mu)
    for m in ("rna", "atac"):
        x = sparse.csr_matrix(md[m].X)
        frac = (x > 0).sum(0).A1 / md.n_obs
        assert list(cells.feature_names[m]) == list(md[m].var_names[frac >= 0.2])
        measured = cells.library(m)[md.n_obs - md[m].n_obs:]  # ATAC lacks the first 50 cells
        np.testing.assert_array_equal(measured, x[:, frac >= 0.2].sum(1).A1)


def test_a_killed_ingest_leaves_no_store_that_opens(tmp_path):
    src = tmp_path / "big.h5ad"
    write_simulation(SimulationConfig(n_cells=30_000, n_genes=1000, seed=1), str(src), progress=False)
    target = tmp_path / "atlas.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "atlasdgd.cli", "ingest", str(src), str(target), "--quiet",
                             "--chunk-cells", "256"])
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once data arrays are being written
        if any((p / "mod" / "rna" / "X" / "data").exists() for p in tmp_path.glob(".atlas.zarr.tmp-*")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    with pytest.raises(StoreError, match="no atlas store"):
        open_store(str(target))
    # a torn store in place (what an interrupted remote ingest leaves) is refused too
    torn = tmp_path / "torn.zarr"
    write_simulation_store(SimulationConfig(n_cells=300, n_genes=50, seed=1), str(torn), progress=False)
    (torn / MANIFEST).unlink()
    with pytest.raises(StoreError, match="not a complete atlas store"):
        open_store(str(torn))


def test_bad_stores_fail_with_clear_messages(tmp_path):
    uri = tmp_path / "s.zarr"
    write_simulation_store(SimulationConfig(n_cells=300, n_genes=50, seed=1), str(uri), progress=False)
    manifest = json.loads((uri / MANIFEST).read_text())
    with pytest.raises(StoreError, match="no atlas store"):
        open_store(str(tmp_path / "nowhere.zarr"))
    (uri / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        open_store(str(uri))
    (uri / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(StoreError, match="not an atlasdgd store"):
        open_store(str(uri))
    bad = {**manifest, "modalities": {"rna": {"n_features": 51, "nnz": 0}}}
    (uri / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="mismatched shapes"):
        open_store(str(uri))
    (uri / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(str(uri))
    # non-integer counts are refused when written, and a store that records no such check (written
    # before the writer made it) is checked when read
    from atlasdgd.store.format import StoreManifest

    frac = tmp_path / "frac.zarr"
    w = StoreWriter(str(frac), 4, {"rna": (3, 1.0)})
    with pytest.raises(StoreError, match=r"non-integer counts in cells 0-4.*raw counts"):
        w.append("rna", sparse.csr_matrix(np.array([[0.5, 0, 1], [0, 2, 0], [1, 1, 1], [0, 0, 3]], np.float32)))
    w.abort()
    assert not frac.exists()
    w = StoreWriter(str(frac), 4, {"rna": (3, 1.0)})
    w.append("rna", sparse.csr_matrix(np.array([[4, 0, 1], [0, 2, 0], [1, 1, 1], [0, 0, 3]], np.float32)))
    w.finish(pd.DataFrame({"dgd_split": pd.Categorical(["train"] * 4), "library_rna": np.ones(4, np.float32),
                           "observed_rna": True}, index=list("abcd")),
             {"rna": pd.DataFrame(index=["g0", "g1", "g2"])}, StoreManifest(4, {"rna": {"n_features": 3, "nnz": 7}}))
    assert json.loads((frac / MANIFEST).read_text())["counts_checked"] is True
    assert open_store(str(frac)).store._check_reads is False
    data = zarr.open_array(str(frac / "mod" / "rna" / "X" / "data"), mode="r+")
    data[0] = 0.5  # the store changed behind the writer's back, and its manifest from before the check
    old = json.loads((frac / MANIFEST).read_text())
    del old["counts_checked"]
    (frac / MANIFEST).write_text(json.dumps(old))
    cells = open_store(str(frac))
    with pytest.raises(StoreError, match="non-integer"):
        next(iter(cells.loader(np.arange(4), 2)))


def test_ingest_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    bad = ad.AnnData(X=sparse.csr_matrix(np.full((5, 3), 0.5, np.float32)))
    bad.write_h5ad(tmp_path / "bad.h5ad")
    assert main(["ingest", str(tmp_path / "bad.h5ad"), str(tmp_path / "out.zarr"), "--quiet"]) == 2
    assert "non-integer" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "bad.h5ad"), str(tmp_path / "out.zarr"), "--label-key", "nope", "--quiet"]) == 2
    assert "'nope' is not a column" in capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = tmp_path_factory.mktemp("store") / "sim.zarr"
    write_simulation_store(SimulationConfig(n_cells=2500, n_types=4, n_batches=2, n_genes=100, n_peaks=150, seed=2),
                           str(uri), progress=False)
    return uri


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_epochs_cover_every_cell_once_across_ranks_with_equal_steps(store, world_size):
    cells = open_store(str(store), )
    rows = cells.split_rows("train")
    seen, steps = [], set()
    for rank in range(world_size):
        loader = cells.loader(rows, 64, seed=3, rank=rank, world_size=world_size, chunk_cells=100, buffer_chunks=2)
        loader.set_epoch(1)
        got = [b.cells.numpy() for b in loader]
        steps.add(len(got))
        assert all(len(g) <= 64 for g in got)
        seen.append(np.concatenate(got))
    assert len(steps) == 1  # DDP: the same number of steps on every rank
    allcells = np.concatenate(seen)
    assert sorted(allcells) == sorted(rows)  # every training cell exactly once
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(seen[a]) & set(seen[b])


def test_loader_order_is_a_function_of_seed_epoch_and_rank(store):
    cells = open_store(str(store))
    rows = cells.split_rows("train")

    def order(seed, epoch, prefetch=4):
        loader = cells.loader(rows, 50, seed=seed, chunk_cells=128, prefetch=prefetch)
        loader.set_epoch(epoch)
        return np.concatenate([b.cells.numpy() for b in loader])

    a = order(0, 0)
    np.testing.assert_array_equal(a, order(0, 0, prefetch=0))
    assert not np.array_equal(a, order(0, 1)) and not np.array_equal(a, order(1, 0))
    # block shuffling: consecutive cells of a batch come from few chunks
    loader = cells.loader(rows, 50, seed=0, chunk_cells=128, buffer_chunks=2)
    first = next(iter(loader)).index.numpy()
    assert len(np.unique(first // 128)) <= 2


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_window_holds_whole_chunks_when_the_last_chunk_is_short(shuffle):
    # 1,000 positions in chunks of 64: the last chunk has 40 cells. Windows are read as whole chunks
    # only if none straddles a shuffle buffer (cut at fixed cell counts, every window after the short
    # chunk did, and read its chunks' cells as scattered rows)
    from atlasdgd.data.plan import BlockShufflePlan

    plan = BlockShufflePlan(1000, 50, chunk_cells=64, buffer_chunks=3, seed=1, shuffle=shuffle)
    for epoch in range(3):
        order, starts = plan.order_windows(epoch)
        np.testing.assert_array_equal(order, plan.order(epoch))
        np.testing.assert_array_equal(np.sort(order), np.arange(1000))
        windows = np.split(order, starts[1:])
        assert len(windows) == -(-16 // 3)  # 16 chunks, 3 per window
        for window in windows:
            chunks = np.unique(window // 64)
            whole = np.concatenate([np.arange(c * 64, min(c * 64 + 64, 1000)) for c in chunks])
            np.testing.assert_array_equal(np.sort(window), whole)


def test_batches_carry_counts_libraries_and_covariates_of_their_cells(store):
    cells = open_store(str(store))
    batch = next(iter(cells.loader(cells.split_rows("train"), 40, seed=0)))
    idx = batch.cells.numpy()
    for m in cells.modalities:
        np.testing.assert_array_equal(batch.counts[m].numpy(), cells.store.read_rows(m, idx).toarray())
        np.testing.assert_array_equal(batch.library[m].numpy(), batch.counts[m].numpy().sum(1))
    np.testing.assert_array_equal(batch.covariates.numpy(), cells.covariate_codes()[idx])


def test_concurrent_reads_by_chunk_or_zarrs_give_exactly_the_default_pipelines_counts(store, monkeypatch):
    # the loader reads a window's chunks concurrently, by atlasdgd's chunk reader on a local store (zarrs
    # where zarr reads); the counts must be those of zarr's own pipeline read one block at a time, and
    # zarr's global config must not change
    import zarr

    from atlasdgd.store import zarr_store

    pytest.importorskip("zarrs", reason="zarrs is not installed: only zarr's own pipeline to compare")
    before = zarr.config.get("codec_pipeline.path")
    fast = open_store(str(store))
    assert type(fast.store._data["rna"]._async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
    assert zarr.config.get("codec_pipeline.path") == before
    monkeypatch.setattr(zarr_store, "fast_codecs", lambda: __import__("contextlib").nullcontext())
    monkeypatch.setenv(zarr_store.READER_ENV, "zarr")  # zarr's own pipeline, not atlasdgd's chunk reader
    plain = open_store(str(store))
    assert type(plain.store._data["rna"]._async_array.codec_pipeline).__name__ != "ZarrsCodecPipeline"
    assert set(fast.store._chunk_readers) == set(fast.modalities) and not plain.store._chunk_readers
    rng = np.random.default_rng(0)
    blocks = [np.sort(rng.choice(fast.n_cells, 300, replace=False)), np.arange(100, 900), np.arange(5, 6)]
    for m in fast.modalities:
        got = fast.read_row_blocks(m, blocks)
        for rows, block in zip(blocks, got):
            want = plain.read_rows(m, rows)
            np.testing.assert_array_equal(block.toarray(), want.toarray())


def test_many_blocks_read_concurrently_through_zarr_finish(store, monkeypatch):
    # zarr's path (remote stores; here forced) reads blocks on the store's threads; a block's own two
    # reads must not queue behind them on the same threads, or more blocks than threads never finish
    import threading

    from atlasdgd.store import zarr_store

    monkeypatch.setenv(zarr_store.READER_ENV, "zarr")
    cells = open_store(str(store))
    assert not cells.store._chunk_readers
    blocks = [np.arange(i * 50, i * 50 + 40) for i in range(3 * zarr_store.READ_THREADS)]
    got = {}
    reader = threading.Thread(target=lambda: got.update(parts=cells.read_row_blocks("rna", blocks)), daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "reading blocks through zarr deadlocked"
    for rows, part in zip(blocks, got["parts"]):
        np.testing.assert_array_equal(part.toarray(), cells.read_rows("rna", rows).toarray())


def test_window_blocks_join_into_one_csr_like_scipys_vstack():
    from atlasdgd.data.window import RowBlock, WindowBuffer

    rng = np.random.default_rng(1)
    parts = [sparse.random(n, 30, density=0.2, format="csr", random_state=rng, dtype=np.float32)
             for n in (5, 0, 17, 1)]
    want = sparse.vstack(parts, format="csr").toarray()
    buffer = WindowBuffer()
    np.testing.assert_array_equal(buffer.join(parts).toarray(), want)
    # blocks handed out as views of a larger read: indptr starts past 0, data/indices hold more
    views = [RowBlock(np.r_[np.float32(7), p.data, np.float32(9)], np.r_[np.int32(0), p.indices, np.int32(0)],
                      p.indptr + 1) for p in parts]
    plain = buffer.join(views)
    np.testing.assert_array_equal(sparse.csr_matrix((plain.data, plain.indices, plain.indptr), shape=want.shape).toarray(),
                                  want)
    # the second join reused the first one's arrays (no new memory per window) and is still exact
    again = buffer.join(parts)
    assert np.shares_memory(again.data, plain.data) and np.shares_memory(again.indices, plain.indices)
    np.testing.assert_array_equal(again.toarray(), want)
    # a larger window grows the buffer
    bigger = buffer.join(parts + parts)
    np.testing.assert_array_equal(bigger.toarray(), np.vstack([want, want]))


def test_a_zarr_window_is_decoded_straight_into_a_reused_buffer(store):
    from atlasdgd.data.window import WindowBuffer

    cells = open_store(str(store))
    rng = np.random.default_rng(4)
    windows = [[np.arange(300, 364), np.arange(0, 64), np.arange(1000, 1001)],  # ranges, in the loader's order
               [np.arange(64, 128), np.arange(900, 1000)],
               [np.sort(rng.choice(cells.n_cells, 50, replace=False)), np.arange(5, 20)]]  # a scattered block
    for m in cells.modalities:
        buffer, previous = WindowBuffer(), None
        for blocks in windows:
            capacity = buffer.nbytes
            got = cells.read_window(m, blocks, buffer)
            want = sparse.vstack([cells.store.read_rows(m, b) for b in blocks], format="csr")
            np.testing.assert_array_equal(got.toarray(), want.toarray())
            assert got.indices.dtype == np.int32  # scipy kept the store's int32 indices (int32 row pointers)
            data, indices = buffer.arrays(len(got.data), got.data.dtype, got.indices.dtype)  # no growth: a view
            assert np.shares_memory(got.data, data) and np.shares_memory(got.indices, indices)
            if previous is not None:  # the previous window's memory, unless this one needed more
                assert np.shares_memory(got.data, previous.data) == (buffer.nbytes == capacity)
            previous = got


@pytest.mark.parametrize("batch_size,shuffle", [(40, True), (64, False)])
def test_batches_kept_after_their_windows_are_reused_still_hold_their_cells(store, batch_size, shuffle):
    # the loader reads every window into one of a few reused buffers: a batch must own its counts and
    # non-zeros, or a later window would overwrite the batches a caller still holds. (64 cells in
    # order with windows of 2 x 32 cells: each batch is a whole window, the case where scipy hands
    # back views of the block itself)
    cells = open_store(str(store))
    batches = list(cells.loader(cells.split_rows("train"), batch_size, shuffle=shuffle, seed=0, chunk_cells=32,
                                buffer_chunks=2))
    assert len(batches) > 10
    for batch in batches:
        idx = batch.cells.numpy()
        for m in cells.modalities:
            want = cells.store.read_rows(m, idx).toarray()
            np.testing.assert_array_equal(batch.counts[m].numpy(), want)
            rows, cols, values = (t.numpy() for t in batch.nonzeros[m])
            dense = np.zeros_like(want)
            dense[rows, cols] = values
            np.testing.assert_array_equal(dense, want)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_shuffling_loader_holds_one_window_at_a_time(store, monkeypatch, prefetch):
    # a batch that spans two windows is filled from the first, whose buffers then take the second:
    # an epoch of many windows makes one buffer per modality, where holding both at every boundary
    # made two (the window is the loader's largest allocation; the test above checks the batches)
    from atlasdgd.data.window import WindowBuffer

    made = []
    init = WindowBuffer.__init__
    monkeypatch.setattr(WindowBuffer, "__init__", lambda self: (made.append(self), init(self))[1])
    cells = open_store(str(store))
    rows = cells.split_rows("train")
    loader = cells.loader(rows, 40, seed=0, chunk_cells=32, buffer_chunks=2, prefetch=prefetch)
    sizes = [len(b) for b in loader]
    assert sum(sizes) == len(rows) and len(rows) > 10 * 64  # many windows of 64 cells, batches across them
    assert len(made) == len(cells.modalities)


def test_a_loader_stopped_early_leaves_no_reader_threads_and_read_errors_reach_the_caller(store, monkeypatch):
    import threading

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith(("atlasdgd-window", "atlasdgd-prefetch"))]

    cells = open_store(str(store))
    rows = cells.split_rows("train")
    it = iter(cells.loader(rows, 32, seed=0, chunk_cells=32, buffer_chunks=2))
    for _ in range(3):
        next(it)
    it.close()  # what a `break` out of the loop does
    deadline = time.time() + 5
    while ours() and time.time() < deadline:
        time.sleep(0.01)
    assert not ours()
    # a window that cannot be read: the caller gets the reader's error, not a hang or a short epoch
    read = type(cells).read_window
    calls = []

    def failing(self, modality, blocks, buffer):
        calls.append(1)
        if len(calls) > 4:
            raise OSError("disk gone")
        return read(self, modality, blocks, buffer)

    monkeypatch.setattr(type(cells), "read_window", failing)
    with pytest.raises(OSError, match="disk gone"):
        for _ in cells.loader(rows, 32, seed=0, chunk_cells=32, buffer_chunks=2):
            pass


def _dense_nonzeros(x: torch.Tensor):
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows.numpy(), cols.numpy(), x[rows, cols].numpy()


@pytest.mark.parametrize("source", ["store", "memory"])
def test_batches_carry_the_nonzeros_of_their_dense_counts_in_row_order(store, source):
    # the likelihood takes the loader's (row, col, value) triples instead of searching the dense block:
    # they must be exactly its non-zeros, in row-major order, for streamed windows and resident CSR alike
    cells = open_store(str(store))
    if source == "memory":
        sim = simulate(SimulationConfig(n_cells=2500, n_types=4, n_batches=2, n_genes=100, n_peaks=150, seed=2))
        sim.obs["dgd_split"] = cells.obs["dgd_split"].to_numpy()
        cells = prepare(sim, label_key="cell_type", covariate_keys=["batch"], split_key="dgd_split")
    loader = cells.loader(cells.split_rows("train"), 96, seed=3, chunk_cells=64, buffer_chunks=3)
    for batch in list(loader)[:5]:
        for m in cells.modalities:
            rows, cols, values = (t.numpy() for t in batch.nonzeros[m])
            want = _dense_nonzeros(batch.counts[m])
            keep = values != 0  # stored zeros are allowed (they add nothing to the likelihood)
            np.testing.assert_array_equal(rows[keep], want[0])
            np.testing.assert_array_equal(cols[keep], want[1])
            np.testing.assert_array_equal(values[keep], want[2])


@pytest.mark.parametrize("source", ["store", "memory", "mudata"])
def test_batch_count_summaries_sum_the_count_terms_of_their_observed_cells(store, h5mu, tmp_path, source):
    # a training step sums the lgamma terms over the batch from the loader's summaries: they must equal
    # the per-cell count terms of the batch's own dense counts, cells without the modality left out
    # (the MuData has 50 cells without ATAC), for streamed windows and resident CSR alike
    from atlasdgd.model.nb import count_term_sums, count_terms_total

    if source == "mudata":
        uri = tmp_path / "mu.zarr"
        ingest(str(h5mu), str(uri), label_key="cell_type", covariate_keys=["batch"], chunk_cells=64, progress=False)
        cells = open_store(str(uri))
    else:
        cells = open_store(str(store))
    if source == "memory":
        cells = prepare(simulate(SimulationConfig(n_cells=900, n_types=4, n_batches=2, n_genes=100, n_peaks=150, seed=2)),
                        label_key="cell_type", covariate_keys=["batch"])
    rng = np.random.default_rng(0)
    loader = cells.loader(cells.split_rows("train"), 96, seed=3, chunk_cells=64, buffer_chunks=3, count_summaries=True)
    assert next(iter(cells.loader(cells.split_rows("train"), 96))).count_summaries is None  # only where asked for
    unobserved = 0
    for batch in loader:
        assert batch.nonzeros is None  # the summaries stand in for them: nothing more to queue or copy
        for m in cells.modalities:
            r = torch.tensor(rng.uniform(0.1, 20.0, batch.counts[m].shape[1]), dtype=torch.float64)
            rows, cols, values = _dense_nonzeros(batch.counts[m])
            per_cell = count_term_sums(torch.tensor(values, dtype=torch.float64), torch.tensor(rows), torch.tensor(cols),
                                       r, len(batch))
            if batch.observed is not None:
                per_cell = per_cell * batch.observed[m]
                unobserved += int((~batch.observed[m]).sum())
            torch.testing.assert_close(count_terms_total(batch.count_summaries[m], r), per_cell.sum(), rtol=1e-6, atol=1e-6)
    assert (unobserved > 0) == (source == "mudata")


def test_a_training_step_from_count_summaries_equals_the_per_cell_step(store):
    # the same step with the count terms per cell (no summaries): equal loss terms, and equal
    # parameters and representations after it
    import copy

    cells = open_store(str(store))
    rows = cells.split_rows("train")
    config = ModelConfig(modalities={"rna": 100, "atac": 150}, latent_dim=4, n_components=4, covariates={"batch": 2})
    module = DGDModule(config, torch.Generator().manual_seed(0))
    start = torch.randn(len(rows), config.representation_dim, generator=torch.Generator().manual_seed(1))
    trainers = [Trainer(copy.deepcopy(module), TrainConfig(batch_size=64), RepresentationTable(start)) for _ in "ab"]
    for batch in list(cells.loader(rows, 64, seed=0, count_summaries=True))[:4]:
        assert batch.count_summaries is not None
        plain = copy.copy(batch)
        plain.count_summaries = None
        (a, objective_a), (b, objective_b) = trainers[0].train_step(batch), trainers[1].train_step(plain)
        assert a.reconstruction_batch and not b.reconstruction_batch
        torch.testing.assert_close(objective_a, objective_b, rtol=1e-5, atol=1e-2)
    for p, q in zip(trainers[0].module.parameters(), trainers[1].module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainers[0].train_table.values, trainers[1].train_table.values, rtol=1e-4, atol=1e-5)


def test_training_from_a_store_equals_training_in_memory_for_the_same_order(store, tmp_path):
    cells = open_store(str(store))
    sim = simulate(SimulationConfig(n_cells=2500, n_types=4, n_batches=2, n_genes=100, n_peaks=150, seed=2))
    sim.obs["dgd_split"] = cells.obs["dgd_split"].to_numpy()
    memory = prepare(sim, label_key="cell_type", covariate_keys=["batch"], split_key="dgd_split")
    rows = cells.split_rows("train")
    np.testing.assert_array_equal(rows, memory.split_rows("train"))
    cfg = ModelConfig(modalities={m: cells.n_features(m) for m in cells.modalities}, latent_dim=4, n_components=4,
                      covariates={"batch": 2})

    def run(loader):
        torch.manual_seed(0)
        module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
        table = RepresentationTable(torch.zeros(len(rows), cfg.representation_dim) + 0.1)
        trainer = Trainer(module, TrainConfig(max_epochs=2), table)
        for epoch in range(2):
            loader.set_epoch(epoch)
            trainer.train_epoch(loader)
        return module.state_dict(), table.values

    streaming = cells.loader(rows, 64, seed=4, chunk_cells=200, buffer_chunks=2)
    in_memory = memory.loader(rows, 64, seed=4, chunk_cells=200, buffer_chunks=2)
    (sa, ta), (sb, tb) = run(streaming), run(in_memory)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_dgd_trains_from_a_store_uri_and_the_cli_too(store, tmp_path):
    import atlasdgd

    model = atlasdgd.DGD(str(store), seed=0)
    assert model.vocab.label_key == "cell_type" and model.model_config.covariates == {"batch": 2}
    model.train(max_epochs=3, min_epochs=1, progress=False)
    cells = model.embed()
    assert cells.n_obs == 2500 and np.isfinite(cells.obsm["X_dgd"]).all()
    assert main(["train", str(store), "--out", str(tmp_path / "m"), "--epochs", "2", "--min-epochs", "1", "--quiet"]) == 0
    assert (tmp_path / "m" / "atlasdgd.json").exists()


@pytest.mark.parametrize("order", ["input", "split"])
def test_soma_and_zarr_backends_give_the_same_batches(h5mu, tmp_path, order):
    zarr_uri, soma_uri = tmp_path / "a.zarr", f"soma://{tmp_path / 'a.soma'}"
    ingest(str(h5mu), str(zarr_uri), label_key="cell_type", covariate_keys=["batch"], order=order, progress=False)
    assert main(["ingest", str(h5mu), soma_uri, "--label-key", "cell_type", "--covariate-key", "batch",
                 "--order", order, "--quiet"]) == 0
    z, s = open_store(str(zarr_uri)), open_store(soma_uri)
    assert s.store.backend == "soma" and s.n_cells == z.n_cells
    np.testing.assert_array_equal(s.obs_names, z.obs_names)
    assert s.covariate_classes() == z.covariate_classes() and s.label_classes() == z.label_classes()
    rows = z.split_rows("train")
    np.testing.assert_array_equal(rows, s.split_rows("train"))
    if order == "split":  # training cells first, as one range
        np.testing.assert_array_equal(rows, np.arange(len(rows)))
    bz = list(z.loader(rows, 100, seed=1, chunk_cells=128))
    bs = list(s.loader(rows, 100, seed=1, chunk_cells=128))
    assert len(bz) == len(bs)
    for a, b in zip(bz, bs):
        np.testing.assert_array_equal(a.cells.numpy(), b.cells.numpy())
        for m in ("rna", "atac"):
            np.testing.assert_array_equal(a.counts[m].numpy(), b.counts[m].numpy())
            np.testing.assert_array_equal(a.library[m].numpy(), b.library[m].numpy())
        np.testing.assert_array_equal(a.covariates.numpy(), b.covariates.numpy())


def test_soma_ingest_reads_the_input_block_by_block_and_leaves_nothing_when_a_block_is_bad(tmp_path, monkeypatch):
    """Out of core: no read asks for more than one block of cells; counts, library sizes and the
    feature filter come out as the input says; a bad block late in the input leaves no experiment."""
    import atlasdgd.store.ingest as ingest_module
    from atlasdgd.errors import InputError
    from atlasdgd.store.soma import ingest_soma

    rng = np.random.default_rng(3)
    x = sparse.random(700, 40, density=0.3, format="lil", random_state=4, dtype=np.float32)
    x[:, 39] = 0  # a feature detected nowhere: the filter drops it
    x[:, 0] = 1  # no empty cell
    x = x.tocsr()
    x.data = rng.integers(1, 20, size=x.nnz).astype(np.float32)
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b"], 700), "batch": rng.choice(["p", "q"], 700)},
                       index=[f"c{i}" for i in range(700)])
    good = tmp_path / "good.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)])).write_h5ad(good)
    sizes = []
    read_block = ingest_module._read_block
    monkeypatch.setattr(ingest_module, "_read_block", lambda root, mod, cells, n: sizes.append(len(cells)) or
                        read_block(root, mod, cells, n))
    uri = ingest_soma(str(good), f"soma://{tmp_path / 'a.soma'}", label_key="cell_type", covariate_keys=["batch"],
                      min_cells_fraction=0.01, chunk_cells=128, order="input")
    assert max(sizes) <= 128 and sum(sizes[-6:]) == 700  # the last six reads are the blocks (the first: the filter's)
    cells = open_store(f"soma://{uri}")
    assert list(cells.store.var["rna"].index) == [f"g{j}" for j in range(39)]
    np.testing.assert_array_equal(cells.store.read_range("rna", 0, 700).toarray(), x[:, :39].toarray())
    np.testing.assert_array_equal(cells.library("rna"), np.asarray(x.sum(axis=1)).ravel())
    np.testing.assert_array_equal(cells.obs_names, obs.index)

    bad = x.tolil()
    bad[650, 3] = 2.5  # non-integer, in the last block
    ad.AnnData(X=bad.tocsr(), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)])).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError, match=r"input rows 650; 0-based"):  # named in the input's rows, whatever the store's order
        ingest_soma(str(tmp_path / "bad.h5ad"), f"soma://{tmp_path / 'b.soma'}", chunk_cells=128)
    assert not (tmp_path / "b.soma").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.soma.tmp")]
    with pytest.raises(StoreError, match="does not exist: create it first"):
        ingest_soma(str(good), f"soma://{tmp_path / 'missing' / 'c.soma'}")


def test_s3_round_trip_ingest_and_train(h5mu, s3, tmp_path):
    uri = "s3://atlas-bucket/atlas.zarr"
    option_args = [f"--storage-option={k}={v}" for k, v in s3.items()]
    assert main(["ingest", str(h5mu), uri, "--label-key", "cell_type", "--covariate-key", "batch", "--quiet",
                 *option_args]) == 0
    remote = open_store(uri, s3)
    ingest(str(h5mu), str(tmp_path / "local.zarr"), label_key="cell_type", covariate_keys=["batch"], progress=False)
    local = open_store(str(tmp_path / "local.zarr"))
    for m in ("rna", "atac"):
        np.testing.assert_array_equal(remote.store.read_range(m, 0, remote.n_cells).toarray(),
                                      local.store.read_range(m, 0, local.n_cells).toarray())
    pd.testing.assert_frame_equal(remote.obs, local.obs)
    with pytest.raises(StoreError, match="already exists"):
        ingest(str(h5mu), uri, storage_options=s3, progress=False)
    assert main(["train", uri, "--out", str(tmp_path / "model"), "--epochs", "2", "--min-epochs", "1", "--quiet",
                 *option_args]) == 0
    with pytest.raises(StoreError, match="no atlas store"):
        open_store("s3://atlas-bucket/missing.zarr", s3)
    # model directories go to and come from object storage too (manifest uploaded last)
    import atlasdgd

    model = atlasdgd.DGD.load(tmp_path / "model")
    model.save("s3://atlas-bucket/models/m", storage_options=s3)
    again = atlasdgd.DGD.load("s3://atlas-bucket/models/m", storage_options=s3)
    np.testing.assert_array_equal(again.representation, model.representation)
    with pytest.raises(Exception, match="already holds a model"):
        model.save("s3://atlas-bucket/models/m", storage_options=s3)


def test_in_memory_and_store_training_of_the_same_cells_give_the_same_start_and_model(store):
    from atlasdgd.train.run import initial_representations, run_training

    cells = open_store(str(store))
    sim = simulate(SimulationConfig(n_cells=2500, n_types=4, n_batches=2, n_genes=100, n_peaks=150, seed=2))
    sim.obs["dgd_split"] = cells.obs["dgd_split"].to_numpy()
    memory = prepare(sim, label_key="cell_type", covariate_keys=["batch"], split_key="dgd_split")
    memory.chunk_cells = cells.chunk_cells  # the same blocks, so the same minibatch order
    cfg = ModelConfig(modalities={m: cells.n_features(m) for m in cells.modalities}, latent_dim=4, n_components=4,
                      covariates={"batch": 2})
    tc = TrainConfig(max_epochs=2, min_epochs=2, heldout_epochs=1, seed=1)

    def fresh():
        torch.manual_seed(0)
        return DGDModule(ModelConfig.from_dict(cfg.to_dict()), generator=torch.Generator().manual_seed(0))

    starts = [initial_representations(fresh(), src, tc, src.split_rows("train")) for src in (memory, cells)]
    np.testing.assert_allclose(starts[0], starts[1], rtol=0, atol=1e-6)
    results = []
    for src in (memory, cells):
        module = fresh()
        run = run_training(module, src, tc, label_codes=src.label_codes(), n_labels=4, progress=False)
        results.append((module.state_dict(), run.values))
    for k, v in results[0][0].items():
        torch.testing.assert_close(v, results[1][0][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


def test_dgd_opens_files_stores_and_soma_alike_and_layer_reaches_soma(h5mu, tmp_path):
    import atlasdgd
    from atlasdgd.errors import InputError

    from_path = atlasdgd.DGD(str(h5mu), label_key="cell_type", covariate_keys=["batch"], seed=0)
    from_object = atlasdgd.DGD(read_input(h5mu), label_key="cell_type", covariate_keys=["batch"], seed=0)
    assert from_path.model_config.to_dict() == from_object.model_config.to_dict()
    assert from_path.vocab.to_dict() == from_object.vocab.to_dict()
    with pytest.raises(InputError, match="does not exist"):
        atlasdgd.DGD(str(tmp_path / "missing.h5ad"))
    zarr_uri = tmp_path / "a.zarr"
    ingest(str(h5mu), str(zarr_uri), label_key="cell_type", covariate_keys=["batch"], progress=False)
    with pytest.raises(InputError, match="layers apply to"):
        atlasdgd.DGD(str(zarr_uri), layer="counts")
    soma_uri = f"soma://{tmp_path / 'a.soma'}"
    assert main(["ingest", str(h5mu), soma_uri, "--label-key", "cell_type", "--covariate-key", "batch", "--quiet"]) == 0
    with pytest.raises(StoreError, match="no X layer 'raw'"):
        atlasdgd.DGD(soma_uri, layer="raw")
    model = atlasdgd.DGD(soma_uri, layer="counts", seed=0)
    assert model.data.store.layer == "counts" and model.model_config.covariates == {"batch": 3}
    assert main(["train", soma_uri, "--layer", "raw", "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert not (tmp_path / "m").exists()
    assert main(["train", soma_uri, "--layer", "counts", "--out", str(tmp_path / "m"), "--epochs", "1",
                 "--min-epochs", "1", "--quiet"]) == 0


def test_a_worker_whose_shard_is_shorter_than_the_steps_gets_empty_batches(store):
    cells = open_store(str(store))
    rows = cells.split_rows("validation")[:3]  # 2 + 1 cells over 2 workers, batch size 1: 2 steps each
    batches = list(cells.loader(rows, 1, seed=0, rank=1, world_size=2))
    assert [len(b) for b in batches] == [1, 0]
    assert batches[1].counts["rna"].shape == (0, cells.n_features("rna"))


def test_cells_in_memory_are_shuffled_freely_each_epoch():
    data = prepare(simulate(SimulationConfig(n_cells=3000, n_types=3, n_batches=2, n_genes=30, seed=1)))
    loader = data.loader(np.arange(3000), 100, seed=0)
    first = next(iter(loader)).cells.numpy()
    # a block shuffle would draw a batch from a few 1024-cell blocks; a permutation spreads it
    assert len(np.unique(first // 100)) > 20


def test_ingest_keeps_every_obs_column_so_a_later_label_key_works(tmp_path):
    from atlasdgd.store.sources import open_cells

    data = simulate(SimulationConfig(n_cells=300, n_types=3, n_batches=2, n_genes=60, seed=4))
    rng = np.random.default_rng(0)
    data.obs["score"] = rng.normal(size=data.n_obs)
    data.obs["count"] = rng.integers(0, 9, data.n_obs)
    data.obs["flag"] = rng.uniform(size=data.n_obs) < 0.5
    note = np.array(["x", "y", None], dtype=object)[rng.integers(0, 3, data.n_obs)]
    data.obs["note"] = note
    path = tmp_path / "in.h5ad"
    data.write_h5ad(path)
    uri = ingest(str(path), str(tmp_path / "s.zarr"), covariate_keys=["batch"], shuffle=True, progress=False)
    cells = open_cells(uri, label_key="cell_type", covariate_keys=["batch"])  # not named at ingest
    obs = cells.obs.loc[data.obs_names]
    np.testing.assert_array_equal(obs["cell_type"].astype(str), data.obs["cell_type"].astype(str))
    np.testing.assert_allclose(obs["score"].to_numpy(), data.obs["score"].to_numpy())
    np.testing.assert_array_equal(obs["count"].to_numpy(), data.obs["count"].to_numpy())
    np.testing.assert_array_equal(obs["flag"].to_numpy(), data.obs["flag"].to_numpy())
    np.testing.assert_array_equal(obs["note"].isna().to_numpy(), pd.isna(note))
    assert len(np.unique(cells.label_codes())) == 3


def test_embed_and_map_write_back_into_soma_and_h5mu(h5mu, tmp_path):
    # results go back where the user's cells live: the SOMA experiment the model was trained from or the
    # query was read from (obsm per measurement, obs columns), or an .h5mu with the query's modalities
    import tiledbsoma
    import tiledbsoma.io as soma_io

    import atlasdgd

    exp = tmp_path / "a.soma"
    assert main(["ingest", str(h5mu), f"soma://{exp}", "--label-key", "cell_type", "--covariate-key", "batch",
                 "--quiet"]) == 0
    model_dir = tmp_path / "m"
    assert main(["train", f"soma://{exp}", "--out", str(model_dir), "--epochs", "2", "--min-epochs", "1",
                 "--quiet"]) == 0
    model = atlasdgd.DGD.load(str(model_dir))
    want = model.embed()
    assert main(["embed", str(model_dir), "--out", f"soma://{exp}"]) == 0
    with tiledbsoma.Experiment.open(str(exp)) as e:
        back = soma_io.to_anndata(e, "rna", X_layer_name="counts")
    back = back[want.obs_names]
    np.testing.assert_allclose(back.obsm["X_dgd"], want.obsm["X_dgd"], rtol=0, atol=0)
    np.testing.assert_allclose(back.obsm["X_dgd_batch"], want.obsm["X_dgd_batch"], rtol=0, atol=0)
    np.testing.assert_array_equal(back.obs["dgd_cluster"].astype(str), want.obs["dgd_cluster"].astype(str))
    assert back.obs["cell_type"].astype(str).tolist() == read_input(h5mu).obs.loc[want.obs_names, "cell_type"].astype(str).tolist()
    # writing again without --overwrite is refused before anything is written; with it, it succeeds
    assert main(["embed", str(model_dir), "--out", f"soma://{exp}"]) == 2
    assert main(["embed", str(model_dir), "--out", f"soma://{exp}", "--overwrite"]) == 0

    # map a SOMA query, results into the same experiment, equal to the API on the same counts
    assert main(["map", str(model_dir), f"soma://{exp}", "--layer", "raw", "--out", f"soma://{exp}",
                 "--overwrite", "--epochs", "1", "--two-step", "0", "--quiet"]) == 2  # no such layer
    assert main(["map", str(model_dir), f"soma://{exp}", "--out", f"soma://{exp}", "--overwrite", "--epochs", "1",
                 "--two-step", "0", "--quiet"]) == 0
    from atlasdgd.store.soma import read_soma_query

    query = read_soma_query(f"soma://{exp}", layer="counts")
    api = atlasdgd.DGD.load(str(model_dir)).map(query, epochs=1, two_step=0, progress=False)
    with tiledbsoma.Experiment.open(str(exp)) as e:
        back = soma_io.to_anndata(e, "rna", X_layer_name="counts")[api.obs_names]
    np.testing.assert_allclose(back.obsm["X_dgd"], api.obsm["X_dgd"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(back.obs["dgd_label"].astype(str), api.obs["dgd_label"].astype(str))

    # an .h5mu query mapped to .h5mu keeps its modalities and gets the results in global obs/obsm
    out = tmp_path / "mapped.h5mu"
    assert main(["map", str(model_dir), str(h5mu), "--out", str(out), "--epochs", "1", "--two-step", "0", "--quiet"]) == 0
    md = mudata.read_h5mu(out)
    assert set(md.mod) == {"rna", "atac"} and md["rna"].X.sum() == read_input(h5mu)["rna"].X.sum()
    assert md.obsm["X_dgd"].shape == (md.n_obs, model.model_config.latent_dim) and "dgd_label" in md.obs
    # results of other cells are refused by the experiment
    other = api[:5].copy()
    other.obs_names = [f"stranger{i}" for i in range(5)]
    from atlasdgd.store.soma import write_soma_results

    with pytest.raises(StoreError, match="not in"):
        write_soma_results(f"soma://{exp}", other, overwrite=True)
