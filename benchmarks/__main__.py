"""One benchmark harness: simulate -> ingest -> train -> map -> update at each atlas size, one table.

    python -m benchmarks run [--sizes 10k,100k,1M] [--genes 2000] [--epochs 2] [--ray] [--json report.json]
    python -m benchmarks side-by-side [--datasets simulated,kang] ...   (DGD beside scVI: side_by_side.py)

Every stage runs in a fresh process (its peak RSS is its own, from getrusage) with atlasdgd's OpenMP
spin (GOMP_SPINCOUNT=3000, atlasdgd/runtime/threads.py) and the given torch threads. Recorded per size and stage: wall seconds, cells/s and peak RSS; for training
also seconds per epoch and training cells/s. The compute floor (forward + backward matrix products of
the decoder at batch 128, :func:`benchmarks.train_throughput.matmul_floor`) is measured in the same run,
so "% of floor" compares like with like: it is measured before the first size and after each train
stage, and the fastest measurement counts (a floor timed in a slow moment of a shared machine would
flatter the step; all measurements are kept in the report). Stores are written with ``order="split"``. The data live in
``--workdir`` (deleted afterwards unless ``--keep``).

``map`` maps 10,000 new cells (another simulation) with the trained model; ``update`` makes a versioned
atlas of the trained model and adds those cells to it as a new batch (a batch class the model has not
seen), the incremental-update path. ``--ray`` adds ``train_ray``: the same training on 2 local Ray workers
of 1 thread each, with the time from the call to the first training step on its own (Ray start, worker
processes, process group, store opening, PCA start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("simulate", "ingest", "train", "map", "update", "train_ray")

CHILD = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
stage, n, genes, epochs, threads, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
import torch
torch.set_num_threads(threads)
t0 = time.perf_counter()
h5, query, store, model_dir = (f"{work}/{name}" for name in ("atlas.h5ad", "query.h5ad", "atlas.zarr", "model"))
out = {}
if stage == "simulate":
    from atlasdgd.simulate import SimulationConfig, write_simulation
    write_simulation(SimulationConfig(n_cells=n, n_genes=genes, n_types=10, n_batches=4, seed=0), h5, overwrite=True, progress=False)
    write_simulation(SimulationConfig(n_cells=min(n, 10_000), n_genes=genes, n_types=10, n_batches=4, seed=1), query, overwrite=True, progress=False)
    out["cells"] = n
elif stage == "ingest":
    from atlasdgd.store.ingest import ingest
    ingest(h5, store, label_key="cell_type", covariate_keys=["batch"], order="split", overwrite=True, progress=False)
    out["cells"] = n
elif stage == "train":
    import atlasdgd
    model = atlasdgd.DGD(store, label_key="cell_type", covariate_keys=["batch"], seed=0)
    history = model.train(max_epochs=epochs, min_epochs=epochs, heldout_epochs=1, progress=False)
    n_train = len(model.data.split_rows("train"))
    epoch_s = float(history["seconds"].mean())
    out.update(cells=n, epochs=len(history), seconds_per_epoch=round(epoch_s, 2),
               train_cells_per_s=round(n_train / epoch_s), val_recon=float(history["val_recon"].iloc[-1]))
    model.save(model_dir, overwrite=True)
elif stage == "map":
    import atlasdgd
    model = atlasdgd.DGD.load(model_dir, device="cpu")
    import anndata
    t1 = time.perf_counter()
    mapped = model.map(anndata.read_h5ad(query), progress=False)
    out.update(cells=int(mapped.n_obs), map_seconds=round(time.perf_counter() - t1, 2))
elif stage == "update":
    import anndata
    from atlasdgd.atlas import Atlas
    new = anndata.read_h5ad(query)
    new.obs_names = ["new_" + name for name in new.obs_names]  # cell names must be new to the atlas
    new.obs["batch"] = "batch_new"  # a batch class the model has not seen
    new.write_h5ad(f"{work}/update.h5ad")
    t1 = time.perf_counter()
    atlas = Atlas.create(f"{work}/atlas", store=store, model=model_dir, progress=False)
    t2 = time.perf_counter()
    record = atlas.update(f"{work}/update.h5ad", progress=False)
    out.update(cells=int(record.n_added), create_seconds=round(t2 - t1, 2), update_seconds=round(time.perf_counter() - t2, 2))
elif stage == "train_ray":
    from atlasdgd.distributed.ray_train import train_on_ray
    options = {"max_epochs": epochs, "min_epochs": epochs, "heldout_epochs": 1}
    t_call = time.time()
    history = train_on_ray(store, f"{work}/model_ray", workers=2, threads=1, train_options=options, progress=False,
                           overwrite=True)
    first_step = float(history["wall_time"].iloc[0] - history["seconds"].iloc[0])
    import atlasdgd
    split = atlasdgd.DGD.load(f"{work}/model_ray", device="cpu").cells.obs["dgd_split"]
    epoch_s = float(history["seconds"].mean())
    out.update(cells=n, epochs=len(history), seconds_per_epoch=round(epoch_s, 2),
               train_cells_per_s=round(int((split == "train").sum()) / epoch_s),
               seconds_to_first_step=round(first_step - t_call, 1))
out.update(seconds=round(time.perf_counter() - t0, 2),
           peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
print(json.dumps(out))
'''


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def run_stage(stage: str, n: int, args, work: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # the stage imports atlasdgd first: its OpenMP spin
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, stage, str(n), str(args.genes), str(args.epochs),
                          str(args.threads), str(work)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}",
                "seconds": round(time.perf_counter() - t0, 1)}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    work_s = out.get("map_seconds", out.get("update_seconds", out["seconds"]))
    out["cells_per_s"] = round(out["cells"] / work_s) if work_s > 0 else None
    return out


def floor_ms(genes: int, threads: int) -> float:
    import atlasdgd  # noqa: F401  # before torch: the same OpenMP spin as the stages
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import matmul_floor

    torch.set_num_threads(threads)
    head = max(100, round(genes**0.5))
    return 1e3 * matmul_floor([24, 100, 100, head, genes], 128, 200)


def table(report: dict) -> str:
    floor = report["floor_ms_per_step"]  # the fastest of floor_ms_measured
    lines = [f"{'cells':>9} {'stage':>9} {'wall s':>8} {'cells/s':>9} {'peak MiB':>9}  notes"]
    for row in report["sizes"]:
        for stage in STAGES:
            r = row.get(stage)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{row['cells']:>9} {stage:>9}  failed: {r['error']}")
                continue
            note = ""
            if stage == "train":
                step_ms = 1e3 * 128 / r["train_cells_per_s"]
                note = (f"{r['seconds_per_epoch']} s/epoch, {r['train_cells_per_s']} train cells/s, "
                        f"{step_ms:.1f} ms/step = {100 * floor / step_ms:.0f}% of floor")
            if stage == "map":
                note = f"{r['cells']} new cells, {r['map_seconds']} s mapping"
            if stage == "update":
                note = f"{r['cells']} cells of a new batch added, {r['update_seconds']} s (atlas created in {r['create_seconds']} s)"
            if stage == "train_ray":
                note = (f"2 workers x 1 thread: {r['seconds_per_epoch']} s/epoch, {r['train_cells_per_s']} train cells/s, "
                        f"first step after {r['seconds_to_first_step']} s")
            lines.append(f"{row['cells']:>9} {stage:>9} {r['seconds']:>8} {r.get('cells_per_s') or '':>9} "
                         f"{r['peak_rss_mib']:>9}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="simulate -> ingest -> train -> map at each size")
    r.add_argument("--sizes", default="10k,100k", help="comma-separated cell counts, e.g. 10k,100k,1M")
    r.add_argument("--genes", type=int, default=2000)
    r.add_argument("--epochs", type=int, default=2, help="training epochs per size (throughput, not quality)")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--workdir", default="runs/harness")
    r.add_argument("--keep", action="store_true", help="keep the simulated files, stores and models")
    r.add_argument("--ray", action="store_true", help="also train on 2 local Ray workers (time to first step)")
    r.add_argument("--json", dest="json_out", help="also write the report to this file")
    sub.add_parser("side-by-side", help="DGD beside scVI (scvi-tools defaults): options of side_by_side.py")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["side-by-side"]:  # its own script, its own options: scVI runs in a venv of its own
        script = Path(__file__).resolve().parent / "side_by_side.py"
        raise SystemExit(subprocess.run([sys.executable, str(script), *argv[1:]]).returncode)
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "genes": args.genes, "epochs": args.epochs,
              "floor_ms_measured": [round(floor_ms(args.genes, args.threads), 3)], "sizes": []}
    for n in sizes:
        work = Path(args.workdir) / f"cells_{n}"
        work.mkdir(parents=True, exist_ok=True)
        row = {"cells": n}
        for stage in STAGES:
            if stage == "train_ray" and not args.ray:
                continue
            row[stage] = run_stage(stage, n, args, work)
            print(f"{n} cells, {stage}: {json.dumps(row[stage])}", file=sys.stderr, flush=True)
            if stage == "train" and "error" not in row[stage]:  # the floor again, beside the step it rates
                report["floor_ms_measured"].append(round(floor_ms(args.genes, args.threads), 3))
            if "error" in row[stage]:
                break
        report["sizes"].append(row)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["floor_ms_per_step"] = min(report["floor_ms_measured"])
    print(table(report))
    print(f"machine: {report['machine']}, {args.threads} threads, {report['date']}; floor "
          f"{report['floor_ms_per_step']} ms per step of 128 cells (fastest of {report['floor_ms_measured']})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
