"""What reading from a store costs a training step: steps on batches already in memory, on batches
read in the trainer's thread (prefetch 0), and on batches from the prefetch thread, alternated in
blocks of steps in one process (so drifts in machine speed hit all three alike).

    python benchmarks/loader_overhead.py [--store runs/loader/sim_100000_2000_split.zarr] [--rounds 12] [--block 40]

The store is the one `benchmarks/loader_throughput.py` writes (100k x 2,000 simulated, --order split).
On a machine whose cores the torch threads already fill, reading costs the step the CPU time it takes
whether a thread does it or not; with spare cores the prefetch thread should hide it. Prints one JSON
line: median and quartiles of ms per step for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import atlasdgd  # noqa: F401  (before torch: OpenMP's wait policy)
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="runs/loader/sim_100000_2000_split.zarr")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block", type=int, default=40, help="training steps per block")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not Path(args.store).exists():
        raise SystemExit(f"{args.store} does not exist: run benchmarks/loader_throughput.py first (it writes it)")
    torch.set_num_threads(args.threads)

    from atlasdgd.optim.row_adam import RepresentationTable
    from atlasdgd.store.cells import open_store
    from atlasdgd.train.trainer import Trainer

    cells = open_store(args.store)
    rows = cells.split_rows("train")
    model = atlasdgd.DGD(args.store, seed=0)
    table = RepresentationTable(torch.randn(len(rows), model.model_config.representation_dim) * 0.5)
    trainer = Trainer(model.module, model.train_config, table)

    def endless(prefetch: int, seed: int):
        epoch = 0
        while True:
            loader = cells.loader(rows, model.train_config.batch_size, seed=seed, prefetch=prefetch, count_summaries=True)
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    inline, prefetched = endless(0, 1), endless(2, 2)
    in_memory = [next(inline) for _ in range(args.block)]
    sources = {"in_memory": lambda i: in_memory[i], "inline": lambda i: next(inline),
               "prefetch_thread": lambda i: next(prefetched)}
    for b in in_memory[:10]:  # warm-up
        trainer.train_step(b)
    times: dict[str, list[float]] = {k: [] for k in sources}
    for _ in range(args.rounds):
        for name, take in sources.items():
            t0 = time.perf_counter()
            for i in range(args.block):
                trainer.train_step(take(i))
            times[name].append(1000 * (time.perf_counter() - t0) / args.block)
    out = {"store": args.store, "threads": args.threads, "rounds": args.rounds, "block": args.block}
    for name, v in times.items():
        q = statistics.quantiles(v, n=4)
        out[f"{name}_ms_per_step"] = {"median": round(statistics.median(v), 2), "q1": round(q[0], 2), "q3": round(q[2], 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
