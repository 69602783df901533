"""Training beside a busy process: how OpenMP's threads wait decides whether sharing cores costs 2x or 30x.

    python benchmarks/shared_cores.py [--cells 20000] [--epochs 3] [--threads 2]

Runs the same short training (simulated cells, fixed epochs) in a fresh process for each case:
alone, and beside a busy 2-thread process (torch matmuls in a loop, OpenMP's default policy, as
another job would be), each with atlasdgd's default (a short spin, GOMP_SPINCOUNT=3000) and with OpenMP's default
(``ATLASDGD_OMP_WAIT_POLICY=default``) and with no spin (``OMP_WAIT_POLICY=PASSIVE``). Prints one JSON line per case: seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TRAIN = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import atlasdgd, torch
torch.set_num_threads({threads})
data = atlasdgd.simulate(n_cells={cells}, n_types=8, n_batches=2, n_genes=1000, seed=0)
model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"], seed=0, device="cpu")
hist = model.train(max_epochs={epochs}, min_epochs={epochs}, progress=False)
print(json.dumps({{"seconds_per_epoch": float(hist["seconds"].median())}}))
"""

BUSY = """
import torch
torch.set_num_threads(2)
a = torch.randn(600, 600)
while True:
    a = torch.tanh(a @ a / 600)
"""


def run(args, busy: bool, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ATLASDGD_OMP_WAIT_POLICY")}
    if policy == "openmp-default":
        env["ATLASDGD_OMP_WAIT_POLICY"] = "default"
    elif policy == "passive":  # no spin at all (atlasdgd's default until 2026-12-03)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin="):  # another spin count, to compare
        env["GOMP_SPINCOUNT"] = policy[5:]
    other = subprocess.Popen([sys.executable, "-c", BUSY], env={k: v for k, v in env.items()
                                                              if k != "ATLASDGD_OMP_WAIT_POLICY"}) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        out = subprocess.run([sys.executable, "-c", TRAIN.format(threads=args.threads, cells=args.cells,
                                                                 epochs=args.epochs)],
                             env=env, capture_output=True, text=True, timeout=args.timeout)
        result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    except subprocess.TimeoutExpired:
        result = {"seconds_per_epoch": None, "timed_out_after_s": args.timeout}
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return {"busy_neighbour": busy, "wait_policy": policy, "threads": args.threads, "cells": args.cells, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--policies", default="atlasdgd-default,passive,openmp-default",
                   help="comma-separated: atlasdgd-default, passive, openmp-default, spin=N")
    p.add_argument("--rounds", type=int, default=1, help="repeat the cases, alternating (this machine drifts)")
    args = p.parse_args()
    for _ in range(args.rounds):
        for busy in (False, True):
            for policy in args.policies.split(","):
                print(json.dumps(run(args, busy, policy)), flush=True)


if __name__ == "__main__":
    main()
