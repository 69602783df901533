"""Where a training step's time goes: torch.profiler over training steps, operators by their own time.

    python benchmarks/step_profile.py [--cells 20000] [--genes 2000] [--steps 50] [--compile] [--json out.json]

Batches come from the loader as ``train`` builds them (with count summaries) and are held in memory,
so the table shows the step alone. Prints ms per step (unprofiled, then profiled: the profiler adds
a few microseconds per operator) and the operators taking the most own time per step; ``--json``
writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import atlasdgd  # noqa: F401  (before torch: OpenMP's wait policy)
import torch
from torch.profiler import ProfilerActivity, profile

from train_throughput import simulated_training

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="the step's dense part compiled (TrainConfig.compile)")
    p.add_argument("--top", type=int, default=25, help="operators to list")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    _, trainer, loader = simulated_training(args.cells, args.genes, args.batch_size, args.compile)
    it = iter(loader)
    batches = [next(it) for _ in range(args.steps + 10)]
    for b in batches[:10]:  # warm-up (and the one compile with --compile)
        trainer.train_step(b)
    batches = batches[10:]
    t = time.perf_counter()
    for b in batches:
        trainer.train_step(b)
    ms_step = 1e3 * (time.perf_counter() - t) / len(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
        ms_profiled = 1e3 * (time.perf_counter() - t) / len(batches)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / len(batches), 3),
            "total_ms_per_step": round(e.cpu_time_total / 1e3 / len(batches), 3),
            "calls_per_step": round(e.count / len(batches), 1)} for e in events[: args.top]]
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / len(batches)
    out = {"cells": args.cells, "genes": args.genes, "batch_size": args.batch_size, "threads": args.threads,
           "compile": args.compile, "ms_per_step": round(ms_step, 2), "ms_per_step_profiled": round(ms_profiled, 2),
           "aten_calls_per_step": round(calls), "top_self_time": top}
    print(f"{ms_step:.2f} ms per step ({ms_profiled:.2f} profiled), {calls:.0f} aten operator calls per step")
    print(f"{'operator':60s} {'self ms':>8s} {'total ms':>9s} {'calls':>6s}   (per step)")
    for row in top:
        print(f"{row['op'][:60]:60s} {row['self_ms_per_step']:8.3f} {row['total_ms_per_step']:9.3f} "
              f"{row['calls_per_step']:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
