"""atlasdgd's DGD beside scVI (scvi-tools defaults) on the same cells and the same split, one table.

    python benchmarks/side_by_side.py [--datasets simulated,kang] [--cells 20000] [--genes 2000]
        [--threads 2] [--max-epochs N] [--scvi-python /work/scvi-venv/bin/python] [--json out.json]

For each data set (simulated: 10 types, 4 batches; Kang PBMC: 4 types, donor as batch, skipped when
../shared/data is absent) one split is made the way ``atlasdgd.DGD`` makes its own (stratified
80/10/10 by label x batch, :func:`atlasdgd.data.adapters.prepare`) and written as an obs column, so
both tools train on the same cells, early-stop on the same validation cells and are scored on the
same test cells. Each tool trains in a fresh process of its own (peak RSS is its own, from
getrusage), one after the other, with ``--threads`` torch threads and GOMP_SPINCOUNT=3000 (atlasdgd's OpenMP spin, for both):
DGD here (``python side_by_side.py dgd-peer ...``, the repository's venv), scVI through
``benchmarks/scvi_peer.py`` in its own venv (scvi-tools must not constrain the project's packages).
Each tool uses its own defaults and its own early stopping (DGD: min 50 epochs, patience 10, best
state restored; scVI: max epochs from its heuristic, patience 45, last state kept); ``--max-epochs``
caps both, for quick checks only.

Scored here, the same way for both, from what each process saved (latent of every cell, predicted
mean counts of the test cells):
- ARI against the labels of the training cells: DGD's mixture clusters (as
  benchmarks/quality_real_data.py), and for both tools Leiden on the latent at K = number of labels
  (:func:`atlasdgd.evaluate.metrics.leiden_clusters`), which is scVI's only clustering.
- test RMSE: sqrt(mean((x - mu)^2)) over every test cell x gene, mu = cell's row sum x decoded
  fractions (as :func:`atlasdgd.evaluate.reconstruction.reconstruction_metrics`, which the DGD process
  also runs as a check). DGD's test cells are mapped as new cells inside ``train`` (its
  ``heldout_epochs``); scVI's go through its encoder. For scVI's default ZINB likelihood mu is the NB
  component's mean; the RMSE of the ZINB mean (1 - dropout) x mu is reported beside it.
- train cells/s = training cells x epochs / wall seconds of the ``train`` call (DGD's includes its
  PCA start and the test cells' mapping), peak RSS after training, epochs, best epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _data import KANG

HERE = Path(__file__).resolve().parent
SETS = {"simulated": ("cell_type", "batch"), "kang": ("cell_type", "donor")}
SPLIT = "split"


def dgd_peer(argv: list[str]) -> None:
    """Train a DGD to early stop on the given split; save latent, clusters, test means (npz) and
    print its info as one JSON line. Runs in a fresh process (see :func:`run_peer`)."""
    p = argparse.ArgumentParser(prog="side_by_side.py dgd-peer")
    for flag in ("--h5ad", "--label-key", "--batch-key", "--split-key", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import atlasdgd  # first: it sets OMP_WAIT_POLICY before torch loads
    import torch
    from atlasdgd.evaluate.reconstruction import reconstruction_metrics

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = atlasdgd.DGD(args.h5ad, label_key=args.label_key, covariate_keys=[args.batch_key],
                         split_key=args.split_key, seed=args.seed, device="cpu")
    t0 = time.perf_counter()
    hist = model.train(progress=False, **({"max_epochs": args.max_epochs} if args.max_epochs else {}),
                       on_epoch=lambda r: r["epoch"] % 10 == 0 and print(
                           f"dgd epoch {r['epoch']}: val {r.get('val_recon', float('nan')):.4f}, {r['seconds']:.1f} s",
                           file=sys.stderr, flush=True))
    train_s = time.perf_counter() - t0
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cells = model.embed()
    modality = next(iter(model.model_config.modalities))
    test = model.data.split_rows("test")
    x, z = model.data.counts[modality][test], model.representation[test]
    lib = np.asarray(x.sum(axis=1), dtype=np.float32).ravel()
    mu = np.exp(model.log_fractions(z)[modality]) * lib[:, None]
    n_train, epochs = len(model.data.split_rows("train")), len(hist)
    best = int(hist.loc[hist["best"], "epoch"].iloc[0]) + 1 if "best" in hist and hist["best"].any() else None
    cfg = model.train_config
    info = {
        "tool": "dgd", "atlasdgd_version": atlasdgd.__version__, "torch_version": torch.__version__,
        "threads": args.threads, "cells": int(model.data.n_cells), "genes": int(x.shape[1]), "train_cells": n_train,
        "max_epochs": cfg.max_epochs, "epochs": epochs, "early_stopped": epochs < cfg.max_epochs, "best_epoch": best,
        "train_seconds": round(train_s, 2), "train_cells_per_s": round(n_train * epochs / train_s, 1),
        "epoch_seconds_total": round(float(hist["seconds"].sum()), 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_train_mib": round(rss_train, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rmse_atlasdgd_check": reconstruction_metrics(model.module, {modality: x}, z)[modality]["rmse"],
        "model": {"latent_dim": model.model_config.latent_dim, "n_components": model.model_config.n_components,
                  "heldout_epochs": cfg.heldout_epochs},
    }
    np.savez(args.out, latent=cells.obsm["X_dgd"].astype(np.float32), clusters=cells.obs["dgd_cluster"].to_numpy(int),
             test_mu=mu.astype(np.float32), test_rows=test, info=json.dumps(info))
    print(json.dumps(info))


def make_data(name: str, args, work: Path) -> Path | None:
    """Write the data set with a ``split`` column (DGD's own stratified split) to ``work``."""
    import anndata as ad

    from atlasdgd.data.adapters import prepare
    from atlasdgd.data.cells import SPLIT_KEY

    label, batch = SETS[name]
    if name == "simulated":
        from atlasdgd.simulate import SimulationConfig, simulate

        adata = simulate(SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_types=10, n_batches=4,
                                          seed=args.seed))
    else:
        if not KANG.exists():
            print(f"kang: skipped, {KANG} not found (set ATLASDGD_DATA to the folder holding the shared data)",
                  file=sys.stderr)
            return None
        adata = ad.read_h5ad(KANG)
    split = prepare(adata, label_key=label, covariate_keys=[batch], seed=args.seed).obs[SPLIT_KEY]
    adata.obs[SPLIT] = split.astype(str).to_numpy()
    path = work / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


def run_peer(cmd: list[str], threads: int) -> dict:
    """One tool in a fresh process: its stderr passes through, its last stdout line is its JSON."""
    env = {**os.environ, "GOMP_SPINCOUNT": "3000", "PYTHONWARNINGS": "ignore",
           **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {"error": f"exit {res.returncode} (see the log above)"}
    return json.loads(lines[-1])


def score(npz: Path, adata, label: str, seed: int) -> dict:
    """ARIs on the training cells and test RMSE, the same way for both tools."""
    from sklearn.metrics import adjusted_rand_score

    from atlasdgd.evaluate.metrics import leiden_clusters

    saved = np.load(npz)
    split = adata.obs[SPLIT].to_numpy()
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    assert np.array_equal(saved["test_rows"], test), "the tool's test cells are not the split's"
    y = adata.obs[label].astype(str).to_numpy()[train]
    k = len(np.unique(y))
    x = adata.X[test].toarray()
    rmse = lambda mu: float(np.sqrt(np.mean((x - mu) ** 2)))  # noqa: E731
    out = {"ari_leiden": adjusted_rand_score(y, leiden_clusters(saved["latent"][train], k, seed)),
           "test_rmse": rmse(saved["test_mu"])}
    if "clusters" in saved:
        out["ari_mixture"] = adjusted_rand_score(y, saved["clusters"][train])
    if "test_mean_zinb" in saved:
        out["test_rmse_zinb_mean"] = rmse(saved["test_mean_zinb"])
    return {k_: round(v, 4) for k_, v in out.items()}


def table(rows: list[dict]) -> str:
    head = ("| data | tool | train cells | epochs (best) | early stop | train wall s | train cells/s | peak RSS MiB "
            "| ARI clusters | ARI Leiden@K | test RMSE |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['tool']} | failed: {r['error']} |")
            continue
        ari = r.get("ari_mixture", r["ari_leiden"])
        rmse = f"{r['test_rmse']:.4f}" + (f" (ZINB mean {r['test_rmse_zinb_mean']:.4f})" if "test_rmse_zinb_mean" in r else "")
        lines.append(f"| {r['data']} | {r['tool']} | {r['train_cells']:,} | {r['epochs']} ({r['best_epoch']}) | "
                     f"{'yes' if r['early_stopped'] else 'no, max ' + str(r['max_epochs'])} | {r['train_seconds']:.1f} | "
                     f"{r['train_cells_per_s']:,.0f} | {r['peak_rss_train_mib']:,.0f} | {ari:.3f} | "
                     f"{r['ari_leiden']:.3f} | {rmse} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["dgd-peer"]:
        return dgd_peer(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="simulated,kang")
    p.add_argument("--cells", type=int, default=20_000, help="simulated cells")
    p.add_argument("--genes", type=int, default=2_000, help="simulated genes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=None, help="cap both tools (checks only; default: their own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scvi-python", default="/work/scvi-venv/bin/python",
                   help="python of a venv with scvi-tools (see benchmarks/scvi_peer.py)")
    p.add_argument("--workdir", default=None, help="keep the data and npz files here (default: a temporary folder)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import anndata as ad

    has_scvi = Path(args.scvi_python).exists()
    if not has_scvi:
        print(f"scVI: skipped, {args.scvi_python} not found (make a venv with scvi-tools and pass --scvi-python)",
              file=sys.stderr)
    cap = ["--max-epochs", str(args.max_epochs)] if args.max_epochs else []
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
              "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "max_epochs": args.max_epochs,
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in [s.strip() for s in args.datasets.split(",") if s.strip()]:
            path = make_data(name, args, work)
            if path is None:
                continue
            label, batch = SETS[name]
            common = ["--h5ad", str(path), "--label-key", label, "--batch-key", batch, "--split-key", SPLIT,
                      "--threads", str(args.threads), "--seed", str(args.seed), *cap]
            peers = {"dgd": [sys.executable, __file__, "dgd-peer"]}
            if has_scvi:
                peers["scvi"] = [args.scvi_python, str(HERE / "scvi_peer.py")]
            adata = ad.read_h5ad(path)
            for tool, cmd in peers.items():  # one after the other, never together
                npz = work / f"{name}_{tool}.npz"
                load = os.getloadavg()[0]  # other work on the machine skews every timing: keep it on record
                info = run_peer([*cmd, *common, "--out", str(npz)], args.threads)
                row = {"data": name, "tool": tool, "load_before": round(load, 2),
                       "load_after_1min": round(os.getloadavg()[0], 2), **info}
                if "error" not in info:
                    row.update(score(npz, adata, label, args.seed))
                report["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(report["rows"]))
    print(f"\n{report['machine']}; {args.threads} torch threads per tool; {report['date']}. ARI clusters: DGD's "
          "mixture, scVI's Leiden@K. test RMSE: NB mean (scVI: ZINB mean in brackets).")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
