"""Command line: thin wrappers that parse arguments and call the Python API.

    atlasdgd simulate --out atlas.h5mu --cells 5000 --peaks 2000
    atlasdgd ingest atlas.h5mu s3://bucket/atlas.zarr --label-key cell_type --covariate-key batch --shuffle
    atlasdgd train atlas.h5mu --out model --label-key cell_type --covariate-key batch
    atlasdgd embed model --out cells.h5ad
    atlasdgd map model query.h5ad --out mapped.h5ad [--new-covariate-classes --save-model model2]
    atlasdgd predict model rna_only.h5ad --out predicted.h5mu
    atlasdgd perturb model query.h5mu --gene Gad1 --group-by cell_type --out deltas.csv
    atlasdgd sample model --cells 100 --component "CD4 T" --out synthetic.h5mu
    atlasdgd evaluate model data.h5mu --label-key cell_type --batch-key batch --out metrics.json
    atlasdgd atlas create atlas_dir data.h5ad --label-key cell_type --covariate-key batch
    atlasdgd atlas update atlas_dir new_batch.h5ad; atlasdgd atlas log atlas_dir; atlasdgd embed atlas_dir@1 ...
    atlasdgd demo
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from atlasdgd.errors import AtlasDGDError
from atlasdgd.io.strict_json import strict_json


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="write a synthetic atlas with known truth (.h5ad, or .h5mu with --peaks/--proteins)")
    p.add_argument("--out", required=True,
                   help="output file: .h5ad (RNA only) or .h5mu; or an atlas store: a .zarr path or any fsspec URI")
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


def _add_device(p, precision: bool = False) -> None:
    from atlasdgd.runtime.device import DEVICE_HELP, PRECISIONS

    p.add_argument("--device", default="auto", help=f"where to compute: {DEVICE_HELP}; default auto")
    if precision:
        p.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="32 (default) or bf16-mixed: decoder matrix products in bf16, likelihood in fp32")


def _add_storage_option(p) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the store URI, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="convert .h5ad/.h5mu/AnnData .zarr into an atlas store, out of core")
    p.add_argument("input", help="input .h5ad, .h5mu or AnnData .zarr with raw counts")
    p.add_argument("store", help="store URI: a path, file://, memory://, s3://...; soma:///path for TileDB-SOMA")
    p.add_argument("--label-key", help="obs column with cell-type labels to carry")
    p.add_argument("--covariate-key", action="append", default=[], help="obs column of a covariate (repeatable)")
    p.add_argument("--split-key", help="obs column with train/validation/test (default: stratified 80/10/10)")
    p.add_argument("--layer", help="layer with raw counts instead of X (for a SOMA query: the X layer, default counts)")
    p.add_argument("--shuffle", action="store_true", help="store cells in a seeded random order (--order shuffle)")
    p.add_argument("--order", choices=["input", "shuffle", "split"], default=None,
                   help="cell order in the store: split = [train | validation | test] each shuffled (the default, "
                        "fastest to train from: held-out cells are read as ranges), shuffle, or input (the input's)")
    p.add_argument("--min-cells-fraction", type=float, default=0.0,
                   help="keep features detected in at least this fraction of cells (default: keep all)")
    p.add_argument("--chunk-cells", type=int, default=4096, help="cells per read block / storage chunk")
    p.add_argument("--seed", type=int, default=0)
    _add_storage_option(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DGD model on an .h5ad/.h5mu file or an atlas store (--workers N: on Ray)")
    _add_device(p, precision=True)
    p.add_argument("data", help="input .h5ad, .h5mu or AnnData .zarr with raw counts, or an atlas store URI")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write each epoch's losses as TensorBoard scalars to DIR (needs the tensorboard package)")
    p.add_argument("--label-key", help="obs column with cell-type labels (sets the number of mixture components)")
    p.add_argument("--covariate-key", action="append", default=[], help="obs column of a batch-like covariate (repeatable)")
    p.add_argument("--modality", action="append", default=None, help="modality to use (repeatable; default all)")
    p.add_argument("--layer", help="layer with raw counts instead of X (for a SOMA query: the X layer, default counts)")
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
                   help="mixture start (auto: label classes when --label-key is given, else Leiden)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (forward, backward, row update): ~2x per CPU step "
                        "of a few thousand genes, ~20-30 s to compile; default: on for CPU runs of >= 50,000 "
                        "training cells per worker (needs a C++ compiler; falls back to eager with a warning)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="never compile the training step")
    p.add_argument("--mixture-step", choices=["adam", "em"], default=None,
                   help="basal mixture update: adam every minibatch, or em once per epoch (see README)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint into OUT/checkpoints every N epochs (default: by wall time, see "
                        "--checkpoint-minutes; 0: none)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                   help="without --checkpoint-every: write a checkpoint once M minutes passed since the last "
                        "(default 5)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers on Ray (default 1: no Ray)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster is started)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--gpus", action="store_true", help="one GPU per Ray worker (NCCL)")
    _add_storage_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="write the trained cells' representations and clusters to .h5ad")
    _add_device(p)
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True,
                   help="output .h5ad, .h5mu, or the SOMA experiment the model was trained from (results into its obs/obsm)")
    p.add_argument("--overwrite", action="store_true")


def _add_query_options(p, epochs_help: str = "refinement epochs after the candidate search (default 20)") -> None:
    p.add_argument("model", help="model directory written by 'atlasdgd train'")
    p.add_argument("query", help="query .h5ad / .h5mu / AnnData .zarr / TileDB-SOMA experiment (soma://PATH) with raw counts")
    p.add_argument("--epochs", type=int, default=20, help=epochs_help)
    p.add_argument("--layer", help="layer with raw counts instead of X (for a SOMA query: the X layer, default counts)")
    p.add_argument("--modality", help="model modality an AnnData query holds (default: the one sharing most feature names)")
    p.add_argument("--modality-key", help="var column naming each feature's modality (AnnData with several)")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="smallest fraction of a modality's model features the query must have (default 0.5)")
    p.add_argument("--memory-budget", type=float, default=512,
                   help="MiB of working memory: one chunk of the candidate search; half of it sizes the "
                        "representation fits' batches (128-1024 cells)")
    p.add_argument("--two-step", type=int, default=None, metavar="M",
                   help="refine each cell's M best candidates for 5 epochs and keep the best (default 3; 0: off)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_map(sub) -> None:
    p = sub.add_parser("map", help="map new cells into a trained model: representations, clusters, labels")
    _add_device(p)
    _add_query_options(p)
    p.add_argument("--out", required=True,
                   help="output .h5ad (obsm X_dgd; obs dgd_cluster, dgd_label, ...), .h5mu (the query's modalities with "
                        "the results in the global obs/obsm), or the SOMA experiment the query was read from")
    p.add_argument("--new-covariate-classes", action="store_true",
                   help="learn one new covariate component per unseen class (else unseen classes map naively)")
    p.add_argument("--save-model", help="write the model (with learned new classes) to this directory")
    p.add_argument("--add-to-atlas", action="store_true", help="with --save-model: include the mapped cells in it")
    p.add_argument("--unknown-below", type=float, default=0.0, metavar="P",
                   help="label cells whose label confidence is below P 'unknown' (default 0: never)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="map cells from the modalities they have and predict all modalities")
    _add_device(p)
    _add_query_options(p)
    p.add_argument("--out", required=True, help="output .h5mu (one modality each) or .h5ad (features concatenated)")


def _add_perturb(sub) -> None:
    p = sub.add_parser("perturb", help="in-silico knock-down of genes: per-feature mean change per group")
    _add_device(p)
    _add_query_options(p)
    p.add_argument("--gene", action="append", required=True, help="gene to perturb (repeatable, or comma-separated)")
    p.add_argument("--group-by", help="obs column to aggregate by (default: all cells together)")
    p.add_argument("--steps", type=int, default=1, help="optimisation steps on the representation (default 1)")
    p.add_argument("--lr", type=float, default=None, help="step size (default: the model's representation lr)")
    p.add_argument("--out", required=True, help="output table: .csv, .tsv or .parquet")


def _add_de(sub) -> None:
    p = sub.add_parser("de", help="differential expression between groups of the model's cells (every modality)")
    _add_device(p)
    p.add_argument("model", help="model directory, ATLAS or ATLAS@N")
    p.add_argument("--groupby", required=True, help="obs column of the model's cells that defines the groups")
    p.add_argument("--group1", action="append", default=None,
                   help="group (repeatable: their union); default: every group in turn against the rest")
    p.add_argument("--group2", action="append", default=None, help="group(s) to compare with (default: the rest)")
    p.add_argument("--delta", type=float, default=0.25,
                   help="log2 fold change that counts as a change for proba_de (default 0.25, as scVI)")
    p.add_argument("--n-samples", type=int, default=5000, help="cell pairs drawn per comparison (default 5000)")
    p.add_argument("--modality", action="append", default=None, help="only these modalities (default: all)")
    p.add_argument("--reference", action="append", default=[], metavar="COVARIATE=CLASS",
                   help="covariate class both groups are decoded at (default: each covariate's first class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output table: .csv, .tsv or .parquet")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _write_table(table, out: str, overwrite: bool) -> None:
    """A results table as .csv, .tsv or .parquet, renamed into place when complete."""
    from atlasdgd.io.atomic import atomic_file

    with atomic_file(out, overwrite) as tmp:
        if out.endswith(".parquet"):
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, sep="\t" if out.endswith(".tsv") else ",")


PLOT_KINDS = ("umap", "clusters", "covariates", "training", "gene-to-peak")


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plots of a model or atlas: umap, clusters, covariates, training, gene-to-peak")
    p.add_argument("model", help="model directory, atlas or ATLAS@N")
    p.add_argument("--kind", required=True, choices=PLOT_KINDS)
    p.add_argument("--color", action="append", default=[],
                   help="obs column to colour the UMAP by (repeatable; default: the label and covariates)")
    p.add_argument("--table", help="gene-to-peak: the table written by 'atlasdgd perturb' (.csv/.tsv/.parquet)")
    p.add_argument("--gene", action="append", default=[], help="gene-to-peak: genes to show (default: all in the table)")
    p.add_argument("--max-cells", type=int, default=20000, help="umap: cells drawn at most (a random sample; default 20000)")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--overwrite", action="store_true")


def cmd_plot(args) -> None:
    from atlasdgd import plotting
    from atlasdgd.io.atomic import atomic_file

    _check_outputs(args, args.out, suffixes=(".png",))
    if args.kind == "gene-to-peak":
        if not args.table:
            raise AtlasDGDError("--kind gene-to-peak needs --table (the output of 'atlasdgd perturb')")
        table = _read_table(args.table)
        with atomic_file(args.out, args.overwrite) as tmp:
            plotting.plot_gene_to_peak(table, tmp, genes=args.gene or None)
        _done(f"wrote the gene-to-peak tracks to {args.out}", out=args.out, kind=args.kind)
        return
    if args.max_cells < 1:
        raise AtlasDGDError(f"--max-cells must be >= 1, got {args.max_cells}")
    model = _load_model(args.model, "cpu")
    with atomic_file(args.out, args.overwrite) as tmp:
        plotting.plot_model(model, args.kind, tmp, color=args.color, max_cells=args.max_cells)
    _done(f"wrote the {args.kind} plot to {args.out}", out=args.out, kind=args.kind)


def _read_table(path: str):
    import pandas as pd

    if not Path(path).exists():
        raise AtlasDGDError(f"--table {path!r} does not exist")
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",")


def cmd_de(args) -> None:
    _check_outputs(args, args.out, suffixes=(".csv", ".tsv", ".parquet"))
    if args.group2 and not args.group1:
        raise AtlasDGDError("--group2 needs --group1")
    model = _load_model(args.model, args.device)
    table = model.differential_expression(args.groupby, args.group1, args.group2, delta=args.delta,
                                          n_samples=args.n_samples, modality=args.modality,
                                          reference=_pairs(args.reference, "--reference") or None, seed=args.seed)
    _write_table(table, args.out, args.overwrite)
    comparisons = table[["group1", "group2"]].drop_duplicates()
    _done(f"wrote {len(table)} rows ({len(comparisons)} comparison(s) x features) to {args.out}", out=args.out,
          rows=len(table), comparisons=len(comparisons))


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate synthetic cells from the model's mixture")
    _add_device(p)
    p.add_argument("model", help="model directory")
    p.add_argument("--cells", type=int, default=100)
    p.add_argument("--component", help="component index or label (default: the whole mixture)")
    p.add_argument("--covariate", action="append", default=[], metavar="KEY=CLASS",
                   help="covariate class of the samples (repeatable; default each covariate's first class)")
    p.add_argument("--library", action="append", default=[], metavar="MODALITY=SIZE",
                   help="library size per modality (default: training median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5mu or .h5ad")
    p.add_argument("--overwrite", action="store_true")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="clustering, batch mixing and held-out reconstruction metrics as JSON")
    _add_device(p)
    _add_query_options(p, epochs_help="refinement epochs for cells the model has not seen (default 20)")
    p.add_argument("--label-key", help="obs column of cell-type labels (ARI, NMI, label silhouette)")
    p.add_argument("--batch-key", help="obs column of batches (batch mixing)")
    p.add_argument("--predict-modality", action="append", default=[],
                   help="also map held-out cells without this modality and score its prediction (repeatable)")
    p.add_argument("--auprc-modality", action="append", default=None,
                   help="modality scored by AUPRC of binarised counts (default: ATAC-like names)")
    p.add_argument("--map-all", action="store_true", help="map every cell, even ones the model was trained on")
    p.add_argument("--out", required=True, help="output metrics .json")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="simulate an RNA+ATAC atlas into a store, train on Ray workers, map a new batch, plot")
    _add_device(p)
    p.add_argument("--out", default="atlasdgd-demo", help="output folder (default ./atlasdgd-demo)")
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (1: train in this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from atlasdgd import __version__

    parser = argparse.ArgumentParser(prog="atlasdgd", description="Deep Generative Decoder models for single-cell atlases")
    parser.add_argument("--version", action="version", version=f"atlasdgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_ingest, _add_train, _add_embed, _add_map, _add_predict, _add_perturb, _add_de,
                _add_sample, _add_evaluate, _add_demo, _add_atlas, _add_plot):
        add(sub)
    for path in CONFIGURABLE:
        p = _subparser(parser, path)
        p.add_argument("--config", metavar="FILE.yaml",
                       help="read options from a YAML file (flags given here win); --print-config writes a complete one")
        p.add_argument("--print-config", action="store_true", help="print every option with its default as YAML, and exit")
    return parser


def cmd_simulate(args) -> None:
    from atlasdgd.simulate import SimulationConfig, write_simulation, write_simulation_store

    cfg = SimulationConfig(n_cells=args.cells, n_types=args.types, n_batches=args.batches, n_genes=args.genes,
                           n_peaks=args.peaks, n_proteins=args.proteins, batch_effect=args.batch_effect, seed=args.seed)
    if "://" in args.out or args.out.rstrip("/").endswith(".zarr"):
        write_simulation_store(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
        _done(f"wrote {args.cells} cells ({', '.join(cfg.modalities)}) to the atlas store {args.out}", out=args.out,
              cells=args.cells, modalities=list(cfg.modalities))
        return
    write_simulation(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    _done(f"wrote {args.cells} cells ({', '.join(cfg.modalities)}) to {args.out}", out=args.out, cells=args.cells,
          modalities=list(cfg.modalities))


def _storage_options(args) -> dict | None:
    options = _pairs(args.storage_option, "--storage-option")
    return options or None


def cmd_ingest(args) -> None:
    from atlasdgd.store.soma import SCHEME, ingest_soma

    if args.shuffle and args.order not in (None, "shuffle"):
        raise AtlasDGDError(f"--shuffle and --order {args.order} contradict each other: pass one")
    from atlasdgd.store.ingest import DEFAULT_ORDER

    order = args.order or ("shuffle" if args.shuffle else DEFAULT_ORDER)  # one cell order for either backend
    if args.store.startswith(SCHEME):
        out = ingest_soma(args.input, args.store, label_key=args.label_key, covariate_keys=args.covariate_key,
                          split_key=args.split_key, layer=args.layer, min_cells_fraction=args.min_cells_fraction,
                          order=order, seed=args.seed, overwrite=args.overwrite, chunk_cells=args.chunk_cells,
                          progress=not args.quiet)
    else:
        from atlasdgd.store.ingest import ingest

        out = ingest(args.input, args.store, label_key=args.label_key, covariate_keys=args.covariate_key,
                     split_key=args.split_key, layer=args.layer, order=order,
                     min_cells_fraction=args.min_cells_fraction, chunk_cells=args.chunk_cells, seed=args.seed,
                     overwrite=args.overwrite, storage_options=_storage_options(args), progress=not args.quiet)
    from atlasdgd.store.cells import open_store

    cells = open_store(out, _storage_options(args) if not args.store.startswith(SCHEME) else None)
    sizes = ", ".join(f"{m} {cells.n_features(m)}" for m in cells.modalities)
    _done(f"ingested {cells.n_cells} cells ({sizes} features) into {args.store}", out=args.store, cells=cells.n_cells,
          features={m: cells.n_features(m) for m in cells.modalities})


def _check_train_target(args) -> None:
    """--out must be new, or hold checkpoints to --resume from, or be replaced with --overwrite."""
    from atlasdgd.io.atomic import check_writable_target

    if "://" in args.out:  # remote model URI: checkpoints there decide, see atlasdgd.train.checkpoint
        return
    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoints").is_dir():
            raise AtlasDGDError(f"--resume: {args.out!r} has no checkpoints to resume from: drop --resume to start afresh")
        return
    if out.exists() and (out / "checkpoints").is_dir() and not args.overwrite:
        raise AtlasDGDError(f"{args.out!r} holds checkpoints of an unfinished run: pass --resume to continue it, "
                            "or --overwrite to start again")
    check_writable_target(args.out, args.overwrite)


def cmd_train(args) -> None:
    from atlasdgd.store.sources import is_store_uri

    if args.workers < 1:
        raise AtlasDGDError(f"--workers must be >= 1, got {args.workers}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--min-epochs", args.min_epochs)):
        if value is not None and value < 1:
            raise AtlasDGDError(f"{flag} must be >= 1, got {value}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise AtlasDGDError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {args.checkpoint_every}")
    if not args.checkpoint_minutes >= 0:
        raise AtlasDGDError(f"--checkpoint-minutes must be >= 0, got {args.checkpoint_minutes}")
    schedule = {"checkpoint_every": args.checkpoint_every or None, "checkpoint_seconds": 60.0 * args.checkpoint_minutes}
    _check_train_target(args)
    model_options = {"label_key": args.label_key, "covariate_keys": args.covariate_key, "modalities": args.modality,
                     "latent_dim": args.latent_dim, "n_components": args.components, "seed": args.seed,
                     "layer": args.layer}
    options = {"max_epochs": args.epochs, "min_epochs": args.min_epochs, "patience": args.patience,
               "batch_size": args.batch_size, "hyperprior": args.hyperprior, "init": args.init,
               "gmm_init": args.gmm_init, "precision": args.precision, "mixture_step": args.mixture_step,
               "compile": args.compile}
    options = {k: v for k, v in options.items() if v is not None}
    if args.workers > 1:
        if not is_store_uri(args.data):
            raise AtlasDGDError("--workers > 1 trains from an atlas store: run 'atlasdgd ingest' first")
        if args.gpus and args.device == "cpu":
            raise AtlasDGDError("--gpus and --device cpu contradict each other: drop one")
        from atlasdgd.distributed.ray_train import train_on_ray

        history = train_on_ray(args.data, args.out, workers=args.workers, address=args.address,
                               storage_options=_storage_options(args), model_options=model_options,
                               train_options=options, resume=args.resume, **schedule,
                               threads=args.threads, overwrite=args.overwrite,
                               use_gpu=args.gpus or args.device.startswith("cuda"),
                               tensorboard=args.tensorboard, progress=not args.quiet)
    else:
        from atlasdgd import DGD

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model = DGD(args.data, modality_key=args.modality_key, split_key=args.split_key, device=args.device,
                    storage_options=_storage_options(args), **model_options)
        checkpoint_uri = None if args.checkpoint_every == 0 else args.out
        from atlasdgd.train.metrics_log import TensorBoardLog

        board = TensorBoardLog(args.tensorboard) if args.tensorboard else None
        try:
            history = model.train(progress=not args.quiet, checkpoint_uri=checkpoint_uri, resume=args.resume,
                                  on_epoch=board, **schedule, **options)
        finally:
            if board is not None:
                board.close()
        model.save(args.out, overwrite=True, storage_options=_storage_options(args))  # replaces the checkpoints
    best = history.loc[history["best"]] if "best" in history else history.tail(1)
    _save_config(args, args.out)  # local model directories only (see there)
    last = history.iloc[-1]
    _done(f"trained {len(history)} epochs (best {int(best['epoch'].iloc[0])}); model written to {args.out}",
          out=args.out, epochs=len(history), best_epoch=int(best["epoch"].iloc[0]),
          final={k: last[k] for k in history.columns if k.startswith(("train_", "val_"))})


def cmd_embed(args) -> None:
    if _is_soma_target(args.out):
        cells = _load_model(args.model, args.device).embed()
        written = _write_soma(cells, args.out, args.overwrite)
        _done(f"wrote {cells.n_obs} cells' results into {args.out} ({written})", out=args.out, cells=cells.n_obs,
              written=written)
        return
    _check_outputs(args, args.out, suffixes=(".h5ad", ".h5mu"))
    cells = _load_model(args.model, args.device).embed()
    _write_results(cells, args.out, args.overwrite)
    _done(f"wrote {cells.n_obs} cells to {args.out} (obsm: {', '.join(cells.obsm)}; obs: dgd_cluster, dgd_split)",
          out=args.out, cells=cells.n_obs, obsm=list(cells.obsm))


def _is_soma_target(path: str) -> bool:
    from atlasdgd.store.soma import SCHEME, is_soma

    return str(path).startswith(SCHEME) or is_soma(path)


def _write_soma(table, uri: str, overwrite: bool) -> dict:
    from atlasdgd.store.soma import write_soma_results

    return write_soma_results(uri, table, overwrite=overwrite)


def _write_results(table, path: str, overwrite: bool, query=None, modality: str = "rna") -> None:
    """Results to .h5ad (the table itself) or .h5mu: the query's modalities (an AnnData query as
    ``modality``) with the results in the MuData's global obs/obsm, where muon keeps joint
    embeddings; without a query (``embed``) the table is the one modality, ``dgd``."""
    if str(path).endswith(".h5mu"):
        import mudata

        from atlasdgd.io.atomic import atomic_file

        md = query if query is not None and hasattr(query, "mod") else None
        if md is None:
            md = mudata.MuData({"dgd": table} if query is None else {modality: query})
            md.obs = md.obs.join(table.obs[[c for c in table.obs if c not in md.obs]])
            for k, v in table.obsm.items():
                md.obsm[k] = v
        with atomic_file(path, overwrite) as tmp:
            md.write_h5mu(tmp)
        return
    _write_h5ad(table, path, overwrite)


def _load_model(ref: str, device):
    """A model directory, an atlas (its latest version) or ATLAS@N (version N)."""
    from atlasdgd import DGD
    from atlasdgd.atlas import Atlas, is_atlas, parse_reference

    uri, version = parse_reference(ref)
    if is_atlas(uri) and not (version is not None and Path(ref).is_dir()):  # a model folder may contain '@'
        return Atlas(uri).model(version, device=device)
    return DGD.load(ref, device=device)


def _add_atlas(sub) -> None:
    p = sub.add_parser("atlas", help="a living reference atlas: create, update with new batches, log, rollback")
    verbs = p.add_subparsers(dest="verb", required=True)
    c = verbs.add_parser("create", help="ingest DATA (or adopt --store) and train version 1 (or adopt --model)")
    c.add_argument("atlas", help="where the atlas lives (a directory or fsspec URI)")
    c.add_argument("data", nargs="?", default=None, help=".h5ad/.h5mu/AnnData .zarr (or give --store)")
    c.add_argument("--store", default=None, help="an existing atlas store to adopt instead of DATA")
    c.add_argument("--model", default=None, help="a model directory trained on those cells, adopted as version 1")
    c.add_argument("--label-key", default=None)
    c.add_argument("--covariate-key", action="append", default=[])
    c.add_argument("--epochs", type=int, default=None, help="maximum training epochs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--quiet", action="store_true")
    u = verbs.add_parser("update", help="add the cells of NEW_DATA as a new version (mapped with the frozen model)")
    u.add_argument("atlas")
    u.add_argument("data")
    u.add_argument("--epochs", type=int, default=20, help="mapping refinement epochs (default 20)")
    u.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="after mapping, train on all cells for up to EPOCHS epochs from the current state (default 0)")
    u.add_argument("--device", default="auto")
    u.add_argument("--quiet", action="store_true")
    lg = verbs.add_parser("log", help="the atlas's versions")
    lg.add_argument("atlas")
    lg.add_argument("--json", action="store_true", help="print a JSON array of the version records")
    r = verbs.add_parser("rollback", help="make version N the latest again (a new version; nothing deleted)")
    r.add_argument("atlas")
    r.add_argument("version", type=int)


def cmd_atlas(args) -> None:
    import json

    from atlasdgd.atlas import Atlas

    if args.verb == "create":
        if args.epochs is not None and args.epochs < 1:
            raise AtlasDGDError(f"--epochs must be >= 1, got {args.epochs}")
        atlas = Atlas.create(args.atlas, args.data, label_key=args.label_key, covariate_keys=args.covariate_key,
                             store=args.store, model=args.model, seed=args.seed, device=args.device,
                             train_options={} if args.epochs is None else {"max_epochs": args.epochs},
                             progress=not args.quiet)
        rec = atlas.record()
        _done(f"atlas {args.atlas}: version {rec.version}, {rec.n_cells} cells", atlas=args.atlas, version=rec.version,
              cells=rec.n_cells)
    elif args.verb == "update":
        if args.epochs < 0 or args.finetune < 0:
            raise AtlasDGDError(f"--epochs and --finetune must be >= 0, got {args.epochs}, {args.finetune}")
        if not Path(args.data).exists():
            raise AtlasDGDError(f"new data {args.data!r} does not exist")
        rec = Atlas(args.atlas).update(args.data, epochs=args.epochs, finetune=args.finetune, device=args.device,
                                       progress=not args.quiet)
        new = {k: v for k, v in rec.added.get("new_classes", {}).items() if v}
        _done(f"atlas {args.atlas}: version {rec.version}, {rec.n_cells} cells (+{rec.n_added})"
              + (f"; new classes {new}" if new else ""), atlas=args.atlas, version=rec.version, cells=rec.n_cells,
              added=rec.n_added, new_classes=new)
    elif args.verb == "log":
        log = Atlas(args.atlas).log()
        if args.json:  # the version records themselves, as this command always printed them
            _done(None, __json__=log)
            return
        for rec in log:
            what = f"rollback to version {rec['rollback_of']}" if rec["rollback_of"] else (
                f"+{rec['n_added']} cells, batches {rec['added'].get('batches', {})}")
            print(f"version {rec['version']}  {rec['time']}  {rec['n_cells']} cells  {what}")
    elif args.verb == "rollback":
        rec = Atlas(args.atlas).rollback(args.version)
        _done(f"atlas {args.atlas}: version {rec.version} = version {args.version} ({rec.n_cells} cells)",
              atlas=args.atlas, version=rec.version, cells=rec.n_cells)


def _check_outputs(args, *paths, suffixes: tuple[str, ...]) -> None:
    from atlasdgd.io.atomic import check_writable_target

    for path in paths:
        if path is None:
            continue
        if suffixes and path is args.out and not str(path).endswith(suffixes):
            raise AtlasDGDError(f"--out {path!r} must end in {' or '.join(suffixes)}")
        check_writable_target(path, args.overwrite)


def _load_for_query(args):
    """Model and query, checked before any work."""
    from atlasdgd import DGD
    from atlasdgd.data.adapters import read_input

    if getattr(args, "epochs", 1) is not None and args.epochs < 0:
        raise AtlasDGDError(f"--epochs must be >= 0, got {args.epochs}")
    model = _load_model(args.model, args.device)
    if _is_soma_target(args.query):
        from atlasdgd.store.soma import read_soma_query

        return model, read_soma_query(args.query, layer=getattr(args, "layer", None))
    if not Path(args.query).exists():
        raise AtlasDGDError(f"query {args.query!r} does not exist")
    query = read_input(args.query)
    return model, query


def _query_kwargs(args) -> dict:
    return {"layer": args.layer, "modality": args.modality, "modality_key": args.modality_key,
            "min_overlap": args.min_overlap}


def _mapping_kwargs(args) -> dict:
    if args.memory_budget <= 0:
        raise AtlasDGDError(f"--memory-budget must be positive, got {args.memory_budget}")
    return {"epochs": args.epochs, "two_step": args.two_step, "memory_budget": int(args.memory_budget * 2**20),
            **_query_kwargs(args)}


def _write_h5ad(adata, path: str, overwrite: bool) -> None:
    from atlasdgd.io.atomic import atomic_file

    with atomic_file(path, overwrite) as tmp:
        adata.write_h5ad(tmp)


def _write_modalities(mods: dict, path: str, overwrite: bool) -> None:
    """One AnnData per modality: .h5mu as MuData, .h5ad as one AnnData (features concatenated)."""
    import anndata as ad

    from atlasdgd.io.atomic import atomic_file

    with atomic_file(path, overwrite) as tmp:
        if str(path).endswith(".h5mu"):
            import mudata

            mudata.MuData(mods).write_h5mu(tmp)
            return
        if len(mods) == 1:
            adata = next(iter(mods.values()))
        else:
            first = next(iter(mods.values()))
            adata = ad.concat(mods, axis=1, label="dgd_modality", merge="first")
            adata.obs = first.obs[[c for c in first.obs.columns if not c.startswith("dgd_library")]].copy()
            for m, a in mods.items():
                adata.obs[f"dgd_library_{m}"] = a.obs["dgd_library"].to_numpy()
                adata.obs[f"dgd_library_source_{m}"] = a.obs["dgd_library_source"].to_numpy()
            adata.obsm = dict(first.obsm)
        adata.write_h5ad(tmp)


def cmd_map(args) -> None:
    from atlasdgd.io.atomic import check_writable_target

    if not 0.0 <= args.unknown_below <= 1.0:
        raise AtlasDGDError(f"--unknown-below must be a probability in [0, 1], got {args.unknown_below}")
    into_soma = _is_soma_target(args.out)
    if into_soma and not _is_soma_target(args.query):
        raise AtlasDGDError(f"--out {args.out!r} is a SOMA experiment: results go back into the experiment the query "
                            "was read from (pass it as the query), or to an .h5ad/.h5mu file")
    if not into_soma:
        _check_outputs(args, args.out, suffixes=(".h5ad", ".h5mu"))
    if args.save_model:
        check_writable_target(args.save_model, args.overwrite)
    elif args.add_to_atlas:
        raise AtlasDGDError("--add-to-atlas needs --save-model DIR (the model directory to write)")
    model, query = _load_for_query(args)
    kwargs = _mapping_kwargs(args)
    if _is_soma_target(args.query):
        kwargs["layer"] = None  # read_soma_query took the counts from --layer already
    mapped = model.map(query, new_covariate_classes=args.new_covariate_classes, add_to_atlas=args.add_to_atlas,
                       unknown_below=args.unknown_below, progress=not args.quiet, **kwargs)
    if into_soma:
        written = _write_soma(mapped, args.out, args.overwrite)
        _done(f"mapped {mapped.n_obs} cells into {args.out} ({written})", out=args.out, cells=mapped.n_obs,
              written=written)
    else:
        if str(args.out).endswith(".h5mu"):
            from atlasdgd.infer.query import _best_matching_modality

            modality = args.modality or _best_matching_modality(query, model.vocab.features, args.modality_key)
            if hasattr(query, "mod"):  # the results go into the query's own MuData (global obs/obsm)
                from atlasdgd.infer.expression import write_into

                write_into(query, mapped, model.model_config.covariates)
            _write_results(mapped, args.out, args.overwrite, query=query, modality=modality)
        else:
            _write_h5ad(mapped, args.out, args.overwrite)
        extra = ", dgd_label, dgd_label_confidence" if "dgd_label" in mapped.obs else ""
        _done(f"mapped {mapped.n_obs} cells to {args.out} (obsm: {', '.join(mapped.obsm)}; obs: dgd_cluster{extra})",
              out=args.out, cells=mapped.n_obs, obsm=list(mapped.obsm))
    if args.save_model:
        model.save(args.save_model, overwrite=args.overwrite)
        _save_config(args, args.save_model)
        _done(f"model with covariate classes {model.vocab.covariates} written to {args.save_model}",
              model=args.save_model, covariate_classes=model.vocab.covariates)


def cmd_predict(args) -> None:
    _check_outputs(args, args.out, suffixes=(".h5mu", ".h5ad"))
    model, query = _load_for_query(args)
    mods = model.predict(query, progress=not args.quiet, **_mapping_kwargs(args))
    _write_modalities(mods, args.out, args.overwrite)
    sources = {m: a.obs["dgd_library_source"].value_counts().to_dict() for m, a in mods.items()}
    _done(f"predicted {', '.join(mods)} for {next(iter(mods.values())).n_obs} cells to {args.out} "
          f"(X: fractions, layer dgd_mean: mean counts; library sizes: {sources})", out=args.out,
          cells=next(iter(mods.values())).n_obs, modalities=list(mods), library_sources=sources)


def cmd_perturb(args) -> None:
    _check_outputs(args, args.out, suffixes=(".csv", ".tsv", ".parquet"))
    if args.steps < 1:
        raise AtlasDGDError(f"--steps must be >= 1, got {args.steps}")
    genes = [g.strip() for item in args.gene for g in item.split(",") if g.strip()]
    model, query = _load_for_query(args)
    kw = _mapping_kwargs(args)
    table = model.perturb(query, genes, group_by=args.group_by, steps=args.steps, lr=args.lr, epochs=kw["epochs"],
                          progress=not args.quiet, **_query_kwargs(args))
    _write_table(table, args.out, args.overwrite)
    _done(f"wrote {len(table)} rows ({len(genes)} genes x groups x features) to {args.out}", out=args.out,
          rows=len(table), genes=genes)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise AtlasDGDError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_sample(args) -> None:
    from atlasdgd import DGD

    _check_outputs(args, args.out, suffixes=(".h5mu", ".h5ad"))
    try:
        library = {k: float(v) for k, v in _pairs(args.library, "--library").items()}
    except ValueError as e:
        raise AtlasDGDError(f"--library sizes must be numbers ({e})") from e
    model = _load_model(args.model, args.device)
    component = args.component
    if component is not None and component.lstrip("-").isdigit():
        component = int(component)
    mods = model.sample(args.cells, component=component, covariates=_pairs(args.covariate, "--covariate"),
                        library=library, seed=args.seed)
    _write_modalities(mods, args.out, args.overwrite)
    _done(f"wrote {args.cells} synthetic cells ({', '.join(mods)}) to {args.out}", out=args.out, cells=args.cells,
          modalities=list(mods))


def cmd_evaluate(args) -> None:
    import json

    from atlasdgd.io.atomic import atomic_file
    from atlasdgd.evaluate.report import evaluate

    _check_outputs(args, args.out, suffixes=(".json",))
    model, data = _load_for_query(args)
    metrics = evaluate(model, data, args.label_key, args.batch_key, predict_modalities=args.predict_modality,
                       auprc_modalities=args.auprc_modality, map_all=args.map_all, epochs=args.epochs,
                       progress=not args.quiet, **_query_kwargs(args))
    with atomic_file(args.out, args.overwrite) as tmp:
        Path(tmp).write_text(strict_json(metrics, indent=1))
    _done(strict_json(metrics, indent=1), out=args.out, metrics=metrics)


def cmd_demo(args) -> None:
    from atlasdgd.demo import run_demo

    result = run_demo(args.out, n_cells=args.cells, max_epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
                      progress=not args.quiet, workers=args.workers, device=args.device)
    _done(None, out=args.out, **(result if isinstance(result, dict) else {}))


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """--quiet, -v/--verbose, --log-file and --json on every command (and every atlas verb)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for p in action.choices.values():
            if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
                _add_common_options(p)
                continue
            have = p._option_string_actions
            if "--quiet" not in have:
                p.add_argument("--quiet", action="store_true", help="no progress bars; log warnings and errors only")
            p.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
            p.add_argument("--log-file", metavar="FILE", help="also write the log (debug level) to FILE")
            if "--json" not in have:
                p.add_argument("--json", action="store_true",
                               help="print one JSON summary (what was written where, key numbers) as the last line")


def _setup_logging(args) -> list[logging.Handler]:
    """The atlasdgd logger: INFO to stderr (WARNING with --quiet, DEBUG with -v), DEBUG to --log-file."""
    logger = logging.getLogger("atlasdgd")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if args.log_file:
        try:
            file = logging.FileHandler(args.log_file)
        except OSError as e:
            raise AtlasDGDError(f"--log-file {args.log_file!r} cannot be written ({e}): choose a writable path") from e
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file)
    for h in handlers:
        logger.addHandler(h)
    return handlers


_SUMMARY: dict = {}


def _done(message: str | None, **summary) -> None:
    """A command's result: the human line on stdout, and the summary that --json prints."""
    if message is not None:
        print(message)
    _SUMMARY.update(summary)


CONFIGURABLE = {("train",), ("map",), ("atlas", "create"), ("atlas", "update")}


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _command_path(argv: list[str]) -> tuple[str, ...]:
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] == ["atlas"]:
        return tuple(words[:2])
    return tuple(words[:1])


def _explicit_dests(argv: list[str]) -> set[str]:
    """The options given on the command line (they win over a --config file)."""
    parser = build_parser()
    _add_common_options(parser)

    def suppress(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    suppress(sub)
            elif a.option_strings:
                a.default = argparse.SUPPRESS

    suppress(parser)
    return set(vars(parser.parse_args(argv)))


def _apply_config(parser, args, argv: list[str]) -> None:
    """Fill the options not given as flags from ``--config`` (checked first: unknown keys, wrong types)."""
    from atlasdgd.io import run_config

    path = _command_path(argv)
    if not getattr(args, "config", None):
        return
    values = run_config.load(args.config, run_config.options_of(_subparser(parser, path)))
    explicit = _explicit_dests(argv)
    for key, value in values.items():
        if key not in explicit:
            setattr(args, key, value)


def _save_config(args, directory: str) -> None:
    """The options this run used, next to what it wrote, for ``--config`` to repeat it."""
    from atlasdgd.io import run_config

    if "://" in str(directory) or not Path(directory).is_dir():
        return
    options = run_config.options_of(_subparser(build_parser(), _command_path([args.command] + (
        [args.verb] if getattr(args, "verb", None) else []))))
    values = {o.name: getattr(args, o.name) for o in options if hasattr(args, o.name)}
    (Path(directory) / run_config.SAVED_NAME).write_text(run_config.dump(values))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_common_options(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--print-config" in argv:
        from atlasdgd.io import run_config

        path = _command_path(argv)
        if path not in CONFIGURABLE:
            print(f"atlasdgd: --print-config applies to {', '.join(' '.join(c) for c in sorted(CONFIGURABLE))}",
                  file=sys.stderr)
            return 2
        print(run_config.template(" ".join(path), run_config.options_of(_subparser(parser, path))), end="")
        return 0
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = {"simulate": cmd_simulate, "ingest": cmd_ingest, "train": cmd_train, "embed": cmd_embed, "map": cmd_map,
               "predict": cmd_predict, "perturb": cmd_perturb, "de": cmd_de, "sample": cmd_sample, "evaluate": cmd_evaluate,
               "demo": cmd_demo, "atlas": cmd_atlas, "plot": cmd_plot}[args.command]
    _SUMMARY.clear()
    command = args.command + (f" {args.verb}" if getattr(args, "verb", None) else "")
    handlers: list[logging.Handler] = []
    code = 0
    try:
        handlers = _setup_logging(args)
        _apply_config(parser, args, argv)
        ray_run = args.command == "train" and args.workers > 1  # the workers' devices are Ray's (--gpus)
        if getattr(args, "device", None) is not None and not ray_run:
            from atlasdgd.runtime.device import resolve_device

            resolve_device(args.device)  # a missing GPU fails before any work or output
        handler(args)
    except (AtlasDGDError, ValueError) as e:
        print(f"atlasdgd {command}: error: {e}", file=sys.stderr)
        _SUMMARY.clear()
        _SUMMARY.update(error=str(e))
        code = 2
    finally:
        for h in handlers:
            logging.getLogger("atlasdgd").removeHandler(h)
            h.close()
    if args.json:
        raw = _SUMMARY.pop("__json__", None)
        print(strict_json(raw if raw is not None else {"command": command, "ok": code == 0, **_SUMMARY}))
    return code


if __name__ == "__main__":
    sys.exit(main())
