"""Differential expression on the shared real data: top features per cell type against known markers.

    python benchmarks/de_real_data.py --dataset kang|snare [--epochs 200] [--top 8]

Trains with defaults (early stopping) on the shared data set, runs ``DGD.differential_expression``
one cell type against the rest, prints the top features by |log2fc| among those up in the type, the
rank of known markers, and the seconds DE takes. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings

import atlasdgd
from atlasdgd.data.adapters import read_input

from _data import KANG, SNARE, require

warnings.filterwarnings("ignore")
SETS = {"kang": (KANG, "cell_type", "donor"), "snare": (SNARE, "cell_type", "batch")}
MARKERS = {  # PBMC (Kang) and mouse cortex (SNARE-seq) markers, by substring of the cell type name
    "kang": {"CD14": ["CD14", "LYZ", "S100A8"], "B": ["MS4A1", "CD79A", "CD79B"], "NK": ["GNLY", "NKG7"],
             "T": ["CD3D", "IL7R", "CD3E"], "FCGR3A": ["FCGR3A", "MS4A7"], "Dendritic": ["FCER1A", "CST3"]},
    "snare": {"Ast": ["Gja1", "Aqp4", "Slc1a3"], "Oli": ["Mbp", "Plp1", "Mog"], "Mic": ["Cx3cr1", "P2ry12"],
              "Pvalb": ["Pvalb"], "Sst": ["Sst"], "Vip": ["Vip"], "L2": ["Cux2"], "L6": ["Foxp2"]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=SETS, default="kang")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    path, label, batch = SETS[args.dataset]
    data = read_input(require(path))
    model = atlasdgd.DGD(data, label_key=label, covariate_keys=[batch], seed=0)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = model.differential_expression(label, modality="rna")
    de_s = time.perf_counter() - t0
    report = {"dataset": args.dataset, "cells": int(model.embed().n_obs), "train_seconds": round(train_s, 1),
              "de_seconds_all_types_rna": round(de_s, 1), "types": {}}
    for group, rows in table.groupby("group1"):
        up = rows[rows["log2fc"] > 0].head(args.top)
        words = re.split(r"[^a-z0-9]+", group.lower())
        markers = [g for key, genes in MARKERS[args.dataset].items() if key.lower() in words for g in genes]
        ranks = {g: int(rows.loc[rows["feature"] == g, "rank"].iloc[0]) for g in markers if (rows["feature"] == g).any()}
        report["types"][group] = {"top_up": list(up["feature"]), "marker_ranks": ranks}
        print(f"{group:>28}: {', '.join(up['feature'])}   markers: {ranks}")
    t0 = time.perf_counter()
    model.differential_expression(label, table["group1"].iloc[0], n_samples=5000)
    report["de_seconds_one_comparison_all_modalities"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
