"""Does a post-hoc encoder make a better or faster mapping start than the candidate search?

    python benchmarks/encoder_start.py kang|snare [--model-dir runs/kang_model]

Trains (or loads) a model, fits an encoder from normalised counts to the training cells'
representations, then maps the held-out test cells three ways: candidate search + 20 refinement
epochs, encoder start + 20 epochs, encoder start + 5 epochs. Prints time, final loss, reconstruction
NLL per feature and label accuracy of each (one JSON line).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import atlasdgd
from atlasdgd.data.adapters import read_input
from _encoder import encode, train_encoder
from atlasdgd.infer.mapping import map_cells

from _data import KANG, SNARE, require

warnings.filterwarnings("ignore")
SETS = {"kang": (KANG, "cell_type", "donor"), "snare": (SNARE, "cell_type", "batch")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=SETS)
    p.add_argument("--model-dir", help="load the trained model from here if it exists, else train and save it")
    p.add_argument("--encoder-epochs", type=int, default=30)
    args = p.parse_args()
    path, label, cov = SETS[args.dataset]
    data = read_input(require(path))
    model = atlasdgd.DGD(data, label_key=label, covariate_keys=[cov], seed=0)
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is not None and (model_dir / "atlasdgd.json").exists():
        trained = atlasdgd.DGD.load(model_dir)
        model.module, model.cells, model.vocab = trained.module, trained.cells, trained.vocab
    else:
        model.train(progress=False)
        if model_dir is not None:
            model.save(model_dir, overwrite=True)
    cells = model.data
    split = cells.obs["dgd_split"].to_numpy()
    train_rows, test_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    import torch

    rep = torch.from_numpy(model.representation[train_rows])
    t0 = time.perf_counter()
    enc, curve = train_encoder(model.model_config.modalities, cells.loader(train_rows, 256, seed=0), rep,
                               epochs=args.encoder_epochs)
    enc_train_s = time.perf_counter() - t0
    truth = cells.obs[label].astype(str).to_numpy()[test_rows]
    options = model.mapping_options()
    out = {"dataset": args.dataset, "test_cells": int(len(test_rows)), "encoder_train_seconds": round(enc_train_s, 1),
           "encoder_final_mse": curve[-1]}

    def score(name, mapping, seconds):
        with torch.no_grad():
            post = model.module.basal.posterior(torch.from_numpy(mapping.values[:, : model.model_config.latent_dim])).numpy()
        from atlasdgd.infer.labels import transfer_labels

        labels, _ = transfer_labels(post, model.vocab.component_labels)
        out[name] = {"seconds": round(seconds, 2), "loss": float(mapping.loss.mean()),
                     "recon_per_feature": float(mapping.recon_per_feature.mean()),
                     "start_loss": float(mapping.search_loss.mean()),
                     "label_accuracy": float((labels.astype(str) == truth).mean())}

    t0 = time.perf_counter()
    score("candidate_search_20", map_cells(model.module, cells, options, rows=test_rows), time.perf_counter() - t0)
    for epochs in (20, 5):
        t0 = time.perf_counter()
        start = encode(enc, cells.loader(test_rows, 256, shuffle=False), len(test_rows))
        opts = model.mapping_options(epochs=epochs)
        score(f"encoder_{epochs}", map_cells(model.module, cells, opts, rows=test_rows, start=start.numpy()),
              time.perf_counter() - t0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
