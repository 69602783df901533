"""A living atlas on real data: Kang PBMC from four donors + the fifth; SNARE-seq 9 libraries + 3.

    python benchmarks/atlas_update.py [--dataset kang|snare] [--donor 1016] [--epochs 1000]

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


from atlasdgd.atlas import Atlas

from atlasdgd.data.adapters import read_input

from _data import KANG, SNARE, require

warnings.filterwarnings("ignore")


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["kang", "snare"], default="kang")
    p.add_argument("--donor", default="1016", help="kang: the donor added by the update")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--map-epochs", type=int, default=20)
    args = p.parse_args()
    path, batch_key = (KANG, "donor") if args.dataset == "kang" else (SNARE, "batch")
    data = read_input(require(path))
    batch = data.obs[batch_key].astype(str)
    added = [args.donor] if args.dataset == "kang" else sorted(batch.unique())[-3:]  # snare: 09J, 09K, 09L
    new = batch.isin(added).to_numpy()
    suffix = ".h5ad" if args.dataset == "kang" else ".h5mu"
    with tempfile.TemporaryDirectory() as tmp:
        first, update = Path(tmp) / f"first{suffix}", Path(tmp) / f"update{suffix}"
        for part, target in ((data[~new].copy(), first), (data[new].copy(), update)):
            part.write(target) if suffix == ".h5mu" else part.write_h5ad(target)
        uri = Path(tmp) / f"{args.dataset}_atlas"
        t0 = time.perf_counter()
        atlas = Atlas.create(str(uri), str(first), label_key="cell_type", covariate_keys=[batch_key],
                             train_options={"max_epochs": args.epochs}, progress=False)
        t_create = time.perf_counter() - t0
        size_v1 = _bytes(uri)
        t0 = time.perf_counter()
        rec = atlas.update(str(update), epochs=args.map_epochs, progress=False)
        t_update = time.perf_counter() - t0
        print(json.dumps({"dataset": args.dataset, "added": added, "create_seconds": round(t_create, 1),
                          "update_seconds": round(t_update, 1), "update_over_create": round(t_update / t_create, 3),
                          "n_cells": rec.n_cells, "n_added": rec.n_added, "metrics": rec.added["metrics"],
                          "new_classes": rec.added["new_classes"],
                          "bytes_v1": size_v1, "bytes_written_by_update": _bytes(uri) - size_v1}))


if __name__ == "__main__":
    main()
