"""Command line: thin wrappers that parse arguments and call the Python API.

    atlasdgd simulate --out atlas.h5mu --cells 5000 --peaks 2000
    atlasdgd train atlas.h5mu --out model --label-key cell_type --covariate-key batch
    atlasdgd embed model --out cells.h5ad
    atlasdgd demo
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from atlasdgd.errors import AtlasDGDError


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="write a synthetic atlas with known truth (.h5ad, or .h5mu with --peaks/--proteins)")
    p.add_argument("--out", required=True, help="output file: .h5ad (RNA only) or .h5mu")
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--types", type=int, default=8, help="cell types (clusters in the true latent space)")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--peaks", type=int, default=0, help="ATAC-like features (0: no ATAC)")
    p.add_argument("--proteins", type=int, default=0, help="protein-like features (0: none)")
    p.add_argument("--batch-effect", type=float, default=0.5, help="sd of per-batch log fold changes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DGD model on an .h5ad/.h5mu file")
    p.add_argument("data", help="input .h5ad, .h5mu or AnnData .zarr with raw counts")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--label-key", help="obs column with cell-type labels (sets the number of mixture components)")
    p.add_argument("--covariate-key", action="append", default=[], help="obs column of a batch-like covariate (repeatable)")
    p.add_argument("--modality", action="append", default=None, help="modality to use (repeatable; default all)")
    p.add_argument("--layer", help="layer with raw counts instead of X")
    p.add_argument("--modality-key", help="var column naming each feature's modality (AnnData with several modalities)")
    p.add_argument("--split-key", help="obs column with train/validation/test (default: stratified 80/10/10)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 1000; early stopping decides)")
    p.add_argument("--min-epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--components", type=int, default=None, help="mixture components (default: number of labels, else 1)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--hyperprior", choices=["dataset", "cell"], default=None, help="how often log p(phi) counts")
    p.add_argument("--init", choices=["pca", "zero"], default=None, help="initial representations")
    p.add_argument("--gmm-init", choices=["auto", "labels", "kmeans", "leiden"], default=None,
                   help="mixture start (auto: label classes when --label-key is given, else k-means)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="write the trained cells' representations and clusters to .h5ad")
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--overwrite", action="store_true")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="simulate a small RNA+ATAC atlas, train, embed and plot")
    p.add_argument("--out", default="atlasdgd-demo", help="output folder (default ./atlasdgd-demo)")
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from atlasdgd import __version__

    parser = argparse.ArgumentParser(prog="atlasdgd", description="Deep Generative Decoder models for single-cell atlases")
    parser.add_argument("--version", action="version", version=f"atlasdgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_train, _add_embed, _add_demo):
        add(sub)
    return parser


def cmd_simulate(args) -> None:
    from atlasdgd.simulate import SimulationConfig, write_simulation

    cfg = SimulationConfig(n_cells=args.cells, n_types=args.types, n_batches=args.batches, n_genes=args.genes,
                           n_peaks=args.peaks, n_proteins=args.proteins, batch_effect=args.batch_effect, seed=args.seed)
    write_simulation(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {args.cells} cells ({', '.join(cfg.modalities)}) to {args.out}")


def cmd_train(args) -> None:
    from atlasdgd import DGD
    from atlasdgd.atomic import check_writable_target
    from atlasdgd.data.adapters import read_input

    check_writable_target(args.out, args.overwrite)
    if not Path(args.data).exists():
        raise AtlasDGDError(f"input {args.data!r} does not exist")
    data = read_input(args.data)
    model = DGD(data, label_key=args.label_key, covariate_keys=args.covariate_key, modalities=args.modality,
                layer=args.layer, modality_key=args.modality_key, split_key=args.split_key,
                latent_dim=args.latent_dim, n_components=args.components, seed=args.seed)
    options = {"max_epochs": args.epochs, "min_epochs": args.min_epochs, "patience": args.patience,
               "batch_size": args.batch_size, "hyperprior": args.hyperprior, "init": args.init,
               "gmm_init": args.gmm_init}
    history = model.train(progress=not args.quiet, **{k: v for k, v in options.items() if v is not None})
    model.save(args.out, overwrite=args.overwrite)
    best = history.loc[history["best"]] if "best" in history else history.tail(1)
    print(f"trained {len(history)} epochs (best {int(best['epoch'].iloc[0])}); model written to {args.out}")


def cmd_embed(args) -> None:
    import anndata as ad

    from atlasdgd import DGD
    from atlasdgd.atomic import atomic_file, check_writable_target

    check_writable_target(args.out, args.overwrite)
    cells = DGD.load(args.model).embed()
    with atomic_file(args.out, args.overwrite) as tmp:
        ad.AnnData.write_h5ad(cells, tmp)
    print(f"wrote {cells.n_obs} cells to {args.out} (obsm: {', '.join(cells.obsm)}; obs: dgd_cluster, dgd_split)")


def cmd_demo(args) -> None:
    from atlasdgd.demo import run_demo

    run_demo(args.out, n_cells=args.cells, max_epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
             progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = {"simulate": cmd_simulate, "train": cmd_train, "embed": cmd_embed, "demo": cmd_demo}[args.command]
    try:
        handler(args)
    except (AtlasDGDError, ValueError) as e:
        print(f"atlasdgd {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
