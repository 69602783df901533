"""Training throughput with 1 and 2 workers on this machine, and the time from `train` to the first step.

    python benchmarks/distributed_throughput.py [--cells 50000] [--genes 2000] [--epochs 3]

Simulates a store, then trains it (a) in one process with 2 torch threads and (b) on 2 local Ray
workers with 1 thread each (so they do not fight over the 2 cores). Cells/s is training cells per
second of epoch time (from the history); start-up is wall time minus epoch time (Ray start, process
group, store opening, PCA start, and at the end test-cell mapping and writing the model).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workdir", default="runs/distributed")
    args = p.parse_args()

    import torch

    import atlasdgd
    from atlasdgd.distributed.ray_train import train_on_ray
    from atlasdgd.simulate import SimulationConfig, write_simulation_store

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"sim_{args.cells}.zarr"
    if not store.exists():
        write_simulation_store(SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_types=10, n_batches=4), str(store),
                               progress=False)
    options = {"max_epochs": args.epochs, "min_epochs": args.epochs, "heldout_epochs": 1}
    out: dict = {"cells": args.cells, "genes": args.genes, "epochs": args.epochs}

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = atlasdgd.DGD(str(store), seed=0)
    hist = model.train(progress=False, **options)
    wall = time.perf_counter() - t0
    n_train = int((model.cells.obs["dgd_split"] == "train").sum())
    out["one_process_cells_per_s"] = round(n_train * len(hist) / hist["seconds"].sum(), 1)
    out["one_process_startup_and_finish_s"] = round(wall - hist["seconds"].sum(), 1)

    model_dir = work / "model_ray"
    t0 = time.perf_counter()
    hist = train_on_ray(str(store), str(model_dir), workers=2, threads=1, train_options=options, progress=False,
                        overwrite=True)
    wall = time.perf_counter() - t0
    out["two_ray_workers_cells_per_s"] = round(n_train * len(hist) / hist["seconds"].sum(), 1)
    out["two_ray_workers_startup_and_finish_s"] = round(wall - hist["seconds"].sum(), 1)
    shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
