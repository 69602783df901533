"""Mixture collapse on simulated data: K = 10-30 types of unequal size, with and without labels.

    python benchmarks/collapse_simulated.py [--types 10 20 30] [--mixture-step adam em]

Prints one JSON line per run: used components, the largest component over the largest type, the
smallest type's cells, ARI, epochs and seconds. A component 'dies' when it ends with no cells.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score

import atlasdgd

warnings.filterwarnings("ignore")


def run(n_types: int, mixture_step: str, labels: bool, args) -> dict:
    data = atlasdgd.simulate(n_cells=args.cells, n_types=n_types, n_batches=2, n_genes=args.genes, seed=args.seed)
    model = atlasdgd.DGD(data, label_key="cell_type" if labels else None, covariate_keys=["batch"],
                         n_components=None if labels else n_types, seed=args.seed)
    t0 = time.perf_counter()
    hist = model.train(max_epochs=args.epochs, min_epochs=args.epochs, progress=False, mixture_step=mixture_step)
    cells = model.embed()
    train = (cells.obs["dgd_split"] == "train").to_numpy()
    truth, cluster = data.obs["cell_type"].to_numpy()[train], cells.obs["dgd_cluster"].to_numpy()[train]
    sizes = np.bincount(np.unique(cluster, return_inverse=True)[1])
    return {"types": n_types, "mixture_step": mixture_step, "labels": labels,
            "used_components": int(len(sizes)), "components": n_types,
            "largest_over_largest_type": round(float(sizes.max() / np.unique(truth, return_counts=True)[1].max()), 3),
            "smallest_type_cells": int(np.unique(truth, return_counts=True)[1].min()),
            "ari": round(adjusted_rand_score(truth, cluster), 4), "epochs": len(hist),
            "reseeded": int(hist.get("components_reseeded", np.zeros(1)).sum()),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", type=int, nargs="+", default=[10, 20, 30])
    p.add_argument("--mixture-step", nargs="+", default=["adam", "em"])
    p.add_argument("--no-labels", action="store_true", help="K given, Leiden start, no label key")
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for k in args.types:
        for step in args.mixture_step:
            print(json.dumps(run(k, step, not args.no_labels, args)), flush=True)


if __name__ == "__main__":
    main()
