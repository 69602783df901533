"""Mapping speed by batch size: the same new cells mapped with 128 cells per step and with the
budget-sized default, each in a fresh process (wall time, peak RSS), and how far apart the results are.

    python benchmarks/mapping_speed.py [--train-cells 5000] [--new-cells 10000] [--genes 2000] [--workdir runs/mapping_speed]

The model is trained once on simulated cells (batches 0-2; 20 epochs) and the new cells come from the
same simulation (batch 3, unseen). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import atlasdgd, numpy as np, torch
torch.set_num_threads(2)
model_dir, query, batch, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = atlasdgd.DGD.load(model_dir)
import anndata as ad
q = ad.read_h5ad(query)
t = time.perf_counter()
mapped = model.map(q, batch_size=None if batch == "auto" else int(batch), progress=False)
seconds = time.perf_counter() - t
np.save(out, mapped.obsm["X_dgd"])
print(json.dumps({"batch_size": batch, "seconds": round(seconds, 1), "cells_per_s": round(q.n_obs / seconds),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "nll_per_feature": float(mapped.obs["dgd_nll_per_feature"].mean())}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-cells", type=int, default=5000)
    p.add_argument("--new-cells", type=int, default=10000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--workdir", default="runs/mapping_speed")
    args = p.parse_args()

    import numpy as np

    import atlasdgd
    from atlasdgd.simulate import SimulationConfig, simulate

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # four batches of about new_cells each: training cells from batches 0-2, new cells from batch 3
    data = simulate(SimulationConfig(n_cells=4 * args.new_cells, n_genes=args.genes, n_types=10, n_batches=4, seed=0))
    held = (data.obs["batch"] == "batch_3").to_numpy()
    train = data[np.flatnonzero(~held)[: args.train_cells]].copy()
    new = data[np.flatnonzero(held)[: args.new_cells]].copy()
    query = work / "query.h5ad"
    new.write_h5ad(query)
    model_dir = work / "model"
    if not (model_dir / "atlasdgd.json").exists():
        model = atlasdgd.DGD(train, label_key="cell_type", covariate_keys=["batch"], seed=0)
        model.train(max_epochs=20, min_epochs=20, progress=False)
        model.save(model_dir, overwrite=True)
    out: dict = {"train_cells": train.n_obs, "new_cells": new.n_obs, "genes": args.genes}
    runs = []
    for batch in ("128", "auto"):
        res = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(query), batch, str(work / f"z_{batch}.npy")],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(res.returncode)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    out["runs"] = runs
    a, b = np.load(work / "z_128.npy"), np.load(work / "z_auto.npy")
    out["max_abs_difference"] = float(np.abs(a - b).max())
    out["speedup"] = round(runs[0]["seconds"] / runs[1]["seconds"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
