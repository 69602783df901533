"""scVI on a given train/validation/test split, for the side-by-side benchmark (benchmarks/side_by_side.py).

    /work/scvi-venv/bin/python benchmarks/scvi_peer.py --h5ad data.h5ad --label-key cell_type \
        --batch-key batch --split-key split --out scvi.npz [--threads 2] [--max-epochs N] [--seed 0]

Runs in its own virtual environment with scvi-tools (it does not import atlasdgd: scvi-tools pins
its own lightning, jax-free torch stack and anndata, which should not constrain the project's).

What it does, and why each choice:
- ``SCVI.setup_anndata(batch_key=...)`` on the raw counts in X and ``SCVI(adata)`` with every model
  default (10 latent dimensions, 128 hidden units, one layer, ZINB likelihood, observed library).
- ``train(early_stopping=True)`` with scvi's other defaults (max_epochs from its heuristic, batch
  128, Adam 1e-3, patience 45 on ``elbo_validation``). The split is ours, not scvi's random one:
  ``datasplitter_kwargs={"external_indexing": [train, validation, test]}`` makes scvi's validation
  set exactly our validation cells and keeps test cells out of training. scvi keeps the last
  weights at the stop (no best-epoch restore), so that is what is evaluated.
- Latent of ALL cells with ``get_latent_representation`` (the encoder's posterior mean): test
  cells are embedded the way scVI embeds new cells.
- Test-cell predicted means from ``get_likelihood_parameters`` (posterior samples of z, averaged):
  ``mean`` is px_rate = observed library (row sum) x the decoder's normalised expression, i.e. the
  same numbers as ``get_normalized_expression(library_size=1) * row sum`` (checked on one run), the
  NB mean; with the default ZINB likelihood the mean count is (1 - dropout) x that, saved as well.
- ``label_key`` is only copied through (scVI is unsupervised; labels are not registered).

Writes an .npz (plain arrays, no pickles): latent [N, d], test_mu [n_test, genes] (NB mean),
test_mean_zinb, test_rows, and ``info`` (a JSON string: timings, epochs, peak RSS, versions).
Prints the same JSON as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--label-key", required=True)
    p.add_argument("--batch-key", required=True)
    p.add_argument("--split-key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=None, help="cap (default: scvi's own heuristic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=25, help="posterior samples of z for the test means")
    args = p.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # before torch loads, as atlasdgd does (the caller sets it too)
    warnings.filterwarnings("ignore")

    import anndata as ad
    import numpy as np
    import scvi
    import torch
    from scvi.model._utils import get_max_epochs_heuristic

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    t_start = time.perf_counter()
    adata = ad.read_h5ad(args.h5ad)
    split = adata.obs[args.split_key].astype(str).to_numpy()
    rows = {s: np.flatnonzero(split == s) for s in ("train", "validation", "test")}

    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key)
    model = scvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=args.max_epochs, early_stopping=True, enable_progress_bar=False,
                datasplitter_kwargs={"external_indexing": [rows["train"], rows["validation"], rows["test"]]})
    train_s = time.perf_counter() - t0
    assert np.array_equal(np.sort(model.validation_indices), rows["validation"]), "scvi changed the validation cells"
    rss_train = peak_rss_mib()
    hist = model.history
    epochs = len(hist["elbo_train"])
    val_elbo = hist["elbo_validation"]["elbo_validation"].to_numpy()

    t0 = time.perf_counter()
    latent = model.get_latent_representation().astype(np.float32)  # every cell, through the encoder
    mu, zinb = [], []
    for start in range(0, len(rows["test"]), 256):  # chunks: samples x cells x genes arrays
        idx = rows["test"][start : start + 256]
        par = model.get_likelihood_parameters(indices=idx, n_samples=args.n_samples, give_mean=False)
        mean = par["mean"].reshape(-1, len(idx), adata.n_vars)
        drop = par.get("dropout", np.zeros_like(mean)).reshape(mean.shape)
        mu.append(mean.mean(0))
        zinb.append(((1 - drop) * mean).mean(0))
    embed_s = time.perf_counter() - t0
    n_train = len(rows["train"])
    # what train(max_epochs=None) used: scvi's heuristic on adata.n_obs (all cells, test included)
    max_epochs = args.max_epochs or get_max_epochs_heuristic(adata.n_obs)
    info = {
        "tool": "scvi", "scvi_version": scvi.__version__, "torch_version": torch.__version__,
        "threads": args.threads, "cells": int(adata.n_obs), "genes": int(adata.n_vars),
        "train_cells": n_train, "validation_cells": len(rows["validation"]), "test_cells": len(rows["test"]),
        "max_epochs": max_epochs, "epochs": epochs, "early_stopped": epochs < max_epochs,
        "best_epoch": int(np.argmin(val_elbo)) + 1 if len(val_elbo) else None,  # 1-based, like epochs
        "train_seconds": round(train_s, 2), "train_cells_per_s": round(n_train * epochs / train_s, 1),
        "embed_predict_seconds": round(embed_s, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_train_mib": rss_train, "peak_rss_mib": peak_rss_mib(),
        "model": {"n_latent": model.module.n_latent, "gene_likelihood": model.module.gene_likelihood,
                  "n_samples_test_means": args.n_samples},
    }
    np.savez(args.out, latent=latent, test_mu=np.concatenate(mu).astype(np.float32),
             test_mean_zinb=np.concatenate(zinb).astype(np.float32), test_rows=rows["test"], info=json.dumps(info))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
