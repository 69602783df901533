"""Training throughput on a simulated 50,000-cell x 2,000-gene atlas, against the compute floor.

    python benchmarks/train_throughput.py [--cells 50000] [--genes 2000] [--steps 200] [--compile]

Prints: cells/s of full training steps (loader + model + optimisers + row-local Adam), the same
without the loader, the compute floor (the decoder's forward + backward matrix multiplications
alone, same shapes), their ratio (our overhead), and peak resident memory. ``--compile`` times the
step as ``train --compile`` runs it (its one-off compile is in the warm-up, reported on its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import atlasdgd  # before torch: OpenMP's wait policy
import torch

from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer

warnings.filterwarnings("ignore")


def matmul_floor(sizes: list[int], batch: int, steps: int) -> float:
    """Seconds per step of forward + backward matmuls of an MLP with these layer sizes."""
    ws = [torch.randn(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    x = torch.randn(batch, sizes[0])

    def step():
        acts = [x]
        for w in ws:
            acts.append(acts[-1] @ w)
        g = torch.ones_like(acts[-1])
        for i in range(len(ws) - 1, -1, -1):
            _ = acts[i].T @ g  # weight gradient
            g = g @ ws[i].T  # input gradient

    for _ in range(5):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def simulated_training(cells: int, genes: int, batch_size: int, compile_step: bool = False):
    """``(model, trainer, loader)`` for steps on a simulated atlas (10 types, 4 batches, every cell in
    training), the loader's batches as ``train`` builds them (with count summaries)."""
    data = atlasdgd.simulate(n_cells=cells, n_genes=genes, n_types=10, n_batches=4, seed=0)
    model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"], split_fractions=(1.0, 0.0, 0.0))
    rows = model.data.split_rows("train")
    table = RepresentationTable(torch.zeros(len(rows), model.model_config.representation_dim))
    trainer = Trainer(model.module, TrainConfig(batch_size=batch_size, compile=compile_step), table)
    return model, trainer, model.data.loader(rows, batch_size, seed=0, count_summaries=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="the step's dense part compiled (TrainConfig.compile)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, trainer, loader = simulated_training(args.cells, args.genes, args.batch_size, args.compile)
    t_setup = time.perf_counter() - t0  # simulation and the model's start (PCA, mixture)
    it = iter(loader)
    batches = [next(it) for _ in range(args.steps)]

    t = time.perf_counter()
    for b in batches[:10]:  # warm-up (and the one compile with --compile)
        trainer.train_step(b)
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
        trainer.train_step(b)
    t_model = (time.perf_counter() - t) / args.steps

    loader.set_epoch(1)
    t = time.perf_counter()
    n = 0
    for i, b in enumerate(loader):
        trainer.train_step(b)
        n += len(b)
        if i + 1 == args.steps:
            break
    t_full = (time.perf_counter() - t) / (i + 1)

    head = max(100, round(args.genes**0.5))
    sizes = [model.model_config.representation_dim, 100, 100, head, args.genes]
    t_floor = matmul_floor(sizes, args.batch_size, args.steps)
    out = {
        "cells": args.cells, "genes": args.genes, "batch_size": args.batch_size, "threads": args.threads,
        "compile": args.compile, "setup_seconds": round(t_setup, 1), "warm_up_seconds": round(t_warm, 1),
        "cells_per_s_full_step": round(args.batch_size / t_full),
        "cells_per_s_model_only": round(args.batch_size / t_model),
        "ms_per_step_full": round(1e3 * t_full, 2),
        "ms_per_step_model": round(1e3 * t_model, 2),
        "ms_per_step_matmul_floor": round(1e3 * t_floor, 3),
        "overhead_ratio": round(t_full / t_floor, 1),
        "epoch_seconds_estimate": round(t_full * len(loader), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
