"""A living atlas on Kang PBMC: create from four donors, update with the fifth.

    python benchmarks/atlas_update.py [--donor 1016] [--epochs 1000]

Prints one JSON line: wall time of create and of update, the added donor's label accuracy, mean
label confidence and reconstruction NLL per feature (from the version record), and the cells and
bytes the update wrote against the atlas's total.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad

from atlasdgd.atlas import Atlas

from _data import KANG, require

warnings.filterwarnings("ignore")


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--donor", default="1016")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--map-epochs", type=int, default=20)
    args = p.parse_args()
    data = ad.read_h5ad(require(KANG))
    new = (data.obs["donor"].astype(str) == args.donor).to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        first, update = Path(tmp) / "first.h5ad", Path(tmp) / "update.h5ad"
        data[~new].copy().write_h5ad(first)
        data[new].copy().write_h5ad(update)
        uri = Path(tmp) / "kang_atlas"
        t0 = time.perf_counter()
        atlas = Atlas.create(str(uri), str(first), label_key="cell_type", covariate_keys=["donor"],
                             train_options={"max_epochs": args.epochs}, progress=False)
        t_create = time.perf_counter() - t0
        size_v1 = _bytes(uri)
        t0 = time.perf_counter()
        rec = atlas.update(str(update), epochs=args.map_epochs, progress=False)
        t_update = time.perf_counter() - t0
        print(json.dumps({"donor": args.donor, "create_seconds": round(t_create, 1),
                          "update_seconds": round(t_update, 1), "update_over_create": round(t_update / t_create, 3),
                          "n_cells": rec.n_cells, "n_added": rec.n_added, "metrics": rec.added["metrics"],
                          "new_classes": rec.added["new_classes"],
                          "bytes_v1": size_v1, "bytes_written_by_update": _bytes(uri) - size_v1}))


if __name__ == "__main__":
    main()
