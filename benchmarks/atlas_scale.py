"""Does an atlas update cost grow with the atlas? The same new batch added to a 10k and a 100k atlas.

    python benchmarks/atlas_scale.py [--sizes 10000 100000] [--new 2000]

Simulates one data set per size (the new batch is the same cells every time: batch 'new' of its own
simulation), creates the atlas with a short training run (quality is not the point here), then times
the update. Prints one JSON line per size: create and update seconds, bytes the update wrote.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import atlasdgd
from atlasdgd.atlas import Atlas

warnings.filterwarnings("ignore")


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--new", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = args.new * 4  # one simulation; its batch_3 is the new batch, renamed so names never collide
        sim = atlasdgd.simulate(n_cells=total, n_types=6, n_batches=4, n_genes=args.genes, seed=1)
        new = sim[sim.obs["batch"] == "batch_3"].copy()
        new.obs_names = [f"new_{i}" for i in range(new.n_obs)]
        new.obs["batch"] = "new_site"
        new.write_h5ad(tmp / "new.h5ad")
        for size in args.sizes:
            data = atlasdgd.simulate(n_cells=size, n_types=6, n_batches=3, n_genes=args.genes, seed=1)
            data.write_h5ad(tmp / f"atlas_{size}.h5ad")
            uri = tmp / f"atlas_{size}"
            t0 = time.perf_counter()
            atlas = Atlas.create(str(uri), str(tmp / f"atlas_{size}.h5ad"), label_key="cell_type",
                                 covariate_keys=["batch"], train_options={"max_epochs": args.epochs, "min_epochs": 1},
                                 progress=False)
            t_create = time.perf_counter() - t0
            before = _bytes(uri)
            t0 = time.perf_counter()
            rec = atlas.update(str(tmp / "new.h5ad"), progress=False)
            t_update = time.perf_counter() - t0
            print(json.dumps({"atlas_cells": size, "new_cells": rec.n_added, "create_seconds": round(t_create, 1),
                              "update_seconds": round(t_update, 1), "atlas_bytes": before,
                              "bytes_written_by_update": _bytes(uri) - before}), flush=True)


if __name__ == "__main__":
    main()
