"""Peak memory of ingesting and of one training epoch from a store, by atlas size.

    python benchmarks/store_memory.py --cells 100000 1000000 [--genes 2000] [--workdir runs/memory]
        [--compile auto|on|off] [--train-only --keep]

For each size, in fresh processes (peak RSS from getrusage): simulate an .h5ad (chunked writer),
`ingest` it into a zarr store (the default order: [train | validation | test]), and train one epoch from the store (PCA start fitted on 20k cells,
then one epoch, validation and one refinement epoch of test cells). Memory should not grow with the
number of cells beyond the representation tables (reported alongside: cells x dims x 4 bytes x 3
for values and the two Adam moments). Prints one JSON line per size. ``--compile``: the training
step's compile setting (``auto``, the default, compiles from 50,000 training cells on, so a slope
between a smaller and a larger size would include the compiler's constant memory: compare sizes
with ``on`` or ``off``). ``--train-only`` trains on stores a ``--keep`` run left in the workdir.
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
step, n, genes, work, compile_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
t0 = time.perf_counter()
h5, store = f"{work}/sim_{n}.h5ad", f"{work}/sim_{n}.zarr"
if step == "simulate":
    from atlasdgd.simulate import SimulationConfig, write_simulation
    write_simulation(SimulationConfig(n_cells=n, n_genes=genes, n_types=10, n_batches=4), h5, overwrite=True, progress=False)
elif step == "ingest":
    from atlasdgd.store.ingest import ingest
    ingest(h5, store, label_key="cell_type", covariate_keys=["batch"], overwrite=True, progress=False)
elif step == "train":
    import torch
    torch.set_num_threads(2)
    import atlasdgd
    model = atlasdgd.DGD(store, seed=0)
    model.train(max_epochs=1, min_epochs=0, heldout_epochs=1, progress=False,
                compile={"auto": "auto", "on": True, "off": False}[compile_step])
print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--workdir", default="runs/memory")
    p.add_argument("--keep", action="store_true", help="keep the simulated files")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="the training step's compile setting")
    p.add_argument("--train-only", action="store_true", help="train on the stores a --keep run left in --workdir")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for n in args.cells:
        record = {"cells": n, "genes": args.genes, "compile": args.compile,
                  "representation_tables_mib": round(n * 22 * 4 * 3 / 2**20, 1)}
        if args.train_only and not (work / f"sim_{n}.zarr").exists():
            raise SystemExit(f"--train-only: no store {work / f'sim_{n}.zarr'}; run once with --keep first")
        for step in ("train",) if args.train_only else ("simulate", "ingest", "train"):
            res = subprocess.run([sys.executable, "-c", CHILD, step, str(n), str(args.genes), str(work), args.compile],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                record[step] = {"error": res.stderr[-2000:]}
                break
            record[step] = json.loads(res.stdout.strip().splitlines()[-1])
        h5 = work / f"sim_{n}.h5ad"
        record["h5ad_mib"] = round(h5.stat().st_size / 2**20, 1) if h5.exists() else None
        if not args.keep and not args.train_only:  # (--train-only runs on stores it did not make)
            import shutil

            h5.unlink(missing_ok=True)
            shutil.rmtree(work / f"sim_{n}.zarr", ignore_errors=True)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
