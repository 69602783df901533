"""Loader throughput: zarr store and TileDB-SOMA vs an in-memory CSR gather of the same batches,
tiledbsoma-ml's ExperimentDataset on the same SOMA experiment, and the share of a training step
spent waiting for data.

    python benchmarks/loader_throughput.py [--cells 100000] [--genes 2000] [--batches 400] [--workdir runs/loader]

Data: simulated RNA as .h5ad, ingested into a zarr store with ``order="split"`` (train, validation and
test cells each contiguous, as ``atlasdgd ingest --order split`` writes them) and into SOMA.
Prints one JSON line (cells/s over one epoch of the training cells, start-up included; batch 128;
one process; 2 torch threads). The data-wait share counts only time spent in ``next()``; what reading
costs a step in CPU and GIL time is what `benchmarks/loader_overhead.py` measures.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def rate(n_cells: int, seconds: float) -> float:
    return round(n_cells / seconds, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="training steps timed for the data-wait share")
    p.add_argument("--workdir", default="runs/loader")
    p.add_argument("--skip-soma", action="store_true")
    p.add_argument("--annbatch-python", help="a Python >= 3.12 with annbatch[zarrs] (see benchmarks/annbatch_peer.py)")
    args = p.parse_args()

    from atlasdgd.simulate import SimulationConfig
    from atlasdgd.store.cells import open_store

    torch.set_num_threads(2)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    zarr_uri = work / f"sim_{args.cells}_{args.genes}_split.zarr"
    cfg = SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_types=10, n_batches=4, seed=0)
    out: dict = {"cells": args.cells, "genes": args.genes, "batch_size": args.batch_size}
    from atlasdgd.simulate import write_simulation
    from atlasdgd.store.format import MANIFEST
    from atlasdgd.store.ingest import ingest

    h5 = work / "sim.h5ad"
    if not (zarr_uri / MANIFEST).exists() or not args.skip_soma or args.annbatch_python:
        write_simulation(cfg, str(h5), overwrite=True, progress=False)
    if not (zarr_uri / MANIFEST).exists():
        # the store as `atlasdgd ingest --order split` writes it: [train | validation | test], each shuffled
        t0 = time.perf_counter()
        ingest(str(h5), str(zarr_uri), label_key="cell_type", covariate_keys=["batch"], order="split", progress=False)
        out["ingest_s"] = round(time.perf_counter() - t0, 1)
    cells = open_store(str(zarr_uri))
    rows = cells.split_rows("train")

    def time_loader(loader) -> float:
        """Cells/s over a whole epoch, start-up included (loaders that read ahead in big blocks
        would look free if the first batch were excluded)."""
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += len(b)
        return rate(n, time.perf_counter() - t0)

    # the streaming loader from zarr
    # three epochs of each, alternating, median (single epochs here vary by 2x run to run)
    loader = cells.loader(rows, args.batch_size, seed=0)
    runs: dict[str, list[float]] = {"zarr_streaming_cells_per_s": [], "zarr_streaming_no_prefetch_cells_per_s": []}
    for _ in range(3):
        runs["zarr_streaming_cells_per_s"].append(time_loader(cells.loader(rows, args.batch_size, seed=0)))
        runs["zarr_streaming_no_prefetch_cells_per_s"].append(
            time_loader(cells.loader(rows, args.batch_size, seed=0, prefetch=0)))
    out.update({k: sorted(v)[1] for k, v in runs.items()})

    # ceiling: the same batch sequence gathered from CSR in memory
    x = cells.store.read_range("rna", 0, cells.n_cells)
    plan_batches = loader.plan.batches(0)
    t0, n = time.perf_counter(), 0
    for positions in plan_batches:
        torch.from_numpy(x[rows[positions]].toarray())
        n += len(positions)
    out["in_memory_csr_gather_cells_per_s"] = rate(n, time.perf_counter() - t0)

    # share of a training step spent waiting for data (DGD step on this data, zarr streaming loader)
    import atlasdgd
    from atlasdgd.optim.row_adam import RepresentationTable
    from atlasdgd.train.trainer import Trainer

    model = atlasdgd.DGD(str(zarr_uri), seed=0)
    table = RepresentationTable(torch.randn(len(rows), model.model_config.representation_dim) * 0.5)
    trainer = Trainer(model.module, model.train_config, table)
    wait = step = 0.0
    # batches as training reads them (with count summaries); ten steps first, untimed: the step
    # compiles there when compile="auto" compiles it (from 50,000 training cells)
    it = iter(cells.loader(rows, args.batch_size, seed=1, count_summaries=True))
    for _ in range(10):
        trainer.train_step(next(it))
    for _ in range(min(args.batches, 200)):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        wait += t1 - t0
        step += t2 - t1
    out["train_step_ms"] = round(1000 * step / min(args.batches, 200), 2)
    out["data_wait_fraction"] = round(wait / (wait + step), 4)

    if not args.skip_soma:
        import tiledbsoma

        from atlasdgd.store.soma import ingest_soma

        try:
            import tiledbsoma_ml
        except ImportError:  # an optional peer: the SOMA numbers of atlasdgd still come
            tiledbsoma_ml = None
            out["tiledbsoma_ml_skipped"] = "not installed (pip install tiledbsoma-ml)"

        soma_path = work / f"sim_{args.cells}_{args.genes}.soma"
        if not soma_path.exists():
            t0 = time.perf_counter()
            ingest_soma(str(h5), f"soma://{soma_path}", label_key="cell_type", covariate_keys=["batch"])
            out["soma_ingest_s"] = round(time.perf_counter() - t0, 1)
        soma = open_store(f"soma://{soma_path}")
        srows = soma.split_rows("train")
        out["soma_streaming_cells_per_s"] = time_loader(soma.loader(srows, args.batch_size, seed=0))
        if tiledbsoma_ml is not None:
            out["tiledbsoma_ml_cells_per_s"] = _tiledbsoma_ml_rate(tiledbsoma, tiledbsoma_ml, soma_path, args.batch_size)
    if args.annbatch_python:
        import subprocess
        import sys

        res = subprocess.run([args.annbatch_python, str(Path(__file__).with_name("annbatch_peer.py")), str(h5), str(work),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        if res.returncode == 0:
            out.update(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            print(res.stderr[-3000:], file=sys.stderr)
            out["annbatch_error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
    if h5.exists():
        h5.unlink()
    print(json.dumps(out))


def _tiledbsoma_ml_rate(tiledbsoma, tiledbsoma_ml, soma_path: Path, batch_size: int) -> float:
    """tiledbsoma-ml's ExperimentDataset over all cells of the experiment, one shuffled epoch."""
    with tiledbsoma.Experiment.open(str(soma_path)) as exp:
        with exp.axis_query(measurement_name="rna") as query:
            ds = tiledbsoma_ml.ExperimentDataset(query, layer_name="counts", batch_size=batch_size, shuffle=True, seed=0)
            t0, n = time.perf_counter(), 0
            for xb, _ in tiledbsoma_ml.experiment_dataloader(ds):
                n += xb.shape[0]
            return rate(n, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
