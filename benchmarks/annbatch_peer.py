"""annbatch's loader on the same cells, for benchmarks/loader_throughput.py (needs Python >= 3.12).

    python3.12 -m venv runs/annbatch-venv && runs/annbatch-venv/bin/pip install "annbatch[zarrs]"
    runs/annbatch-venv/bin/python benchmarks/annbatch_peer.py INPUT.h5ad WORKDIR [--batch-size 128]

On a Debian 12 machine without Python >= 3.12 (this project's: 3.11 only), as root, a Debian 13 chroot
gives one (Python 3.13; ~5 minutes; the host's CA bundle where a proxy re-signs TLS):

    apt-get install -y debootstrap
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie /tmp/trixie
    mkdir -p /tmp/trixie/work && mount --bind /work /tmp/trixie/work   # the repository's parent
    mount -t proc proc /tmp/trixie/proc && mount --bind /dev /tmp/trixie/dev
    cp /etc/resolv.conf /tmp/trixie/etc/ && cp /etc/ssl/certs/ca-certificates.crt /tmp/trixie/etc/ssl/certs/
    chroot /tmp/trixie sh -c 'python3 -m venv /opt/annbatch && /opt/annbatch/bin/pip install "annbatch[zarrs]"'

and a wrapper to pass as ``loader_throughput.py --annbatch-python`` (same working directory inside):

    #!/bin/sh
    exec chroot /tmp/trixie /bin/sh -c 'cd "$1" && shift && exec /opt/annbatch/bin/python "$@"' sh "$PWD" "$@"

Standalone (does not import atlasdgd, which stays on Python 3.11). Converts INPUT into an annbatch
DatasetCollection (shuffled, sharded zarr; conversion time reported) and times one epoch of its
Loader, start-up included. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input")
    p.add_argument("workdir")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()

    import anndata as ad
    import zarr
    from annbatch import DatasetCollection, Loader

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    out = {"annbatch_batch_size": args.batch_size}
    path = Path(args.workdir) / "annbatch_collection.zarr"
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    collection = DatasetCollection(str(path))
    collection.add_adatas(adata_paths=[args.input], shuffle=True)
    out["annbatch_convert_s"] = round(time.perf_counter() - t0, 1)

    def load(g: zarr.Group) -> ad.AnnData:  # counts only, like atlasdgd's loader
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]))

    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(batch_size=args.batch_size, chunk_size=32, preload_nchunks=256).use_collection(
            collection, load_adata=load)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        x = batch["X"]
        x = x.toarray() if hasattr(x, "toarray") else x  # dense minibatches, as atlasdgd's loader yields
        n += x.shape[0]
    seconds = time.perf_counter() - t0
    out["annbatch_cells"] = n
    out["annbatch_cells_per_s"] = round(n / seconds, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
