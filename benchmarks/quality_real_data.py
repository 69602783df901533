"""Train on a shared real data set and compare GMM clusters with Leiden on PCA at the same K.

    python benchmarks/quality_real_data.py --dataset kang [--hyperprior cell] [--init zero] ...
    python benchmarks/quality_real_data.py --dataset simulated --cells 100000 [--compile]

``--dataset simulated`` trains on the project's simulator (2,000 genes, 10 types, 4 batches; labels are
the true types): atlas sizes the shared sets do not reach. Give it ``--max-epochs``: 100k simulated cells
still improved their validation loss slowly after 90 epochs (2026-12-07), so early stopping can take hours.

Prints one JSON line: ARI of the DGD's mixture clusters and of Leiden on PCA of log-normalised
counts of the same training cells at the same number of clusters, batch mixing of both
embeddings, epochs, best epoch, validation NB NLL per feature and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score

import atlasdgd
from atlasdgd.data.adapters import read_input
from atlasdgd.evaluate.metrics import batch_mixing, leiden_clusters, log_normalised_pca

from _data import KANG, SNARE, require

warnings.filterwarnings("ignore")
SETS = {"kang": (KANG, "cell_type", "donor"), "snare": (SNARE, "cell_type", "batch"),
        "simulated": (None, "cell_type", "batch")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=SETS, default="kang")
    p.add_argument("--cells", type=int, default=100_000, help="cells of --dataset simulated")
    p.add_argument("--max-epochs", type=int, default=1000)
    p.add_argument("--min-epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--hyperprior", default="cell")
    p.add_argument("--init", default="pca")
    p.add_argument("--gmm-init", default="auto")
    p.add_argument("--mixture-step", default="adam", choices=["adam", "em"])
    p.add_argument("--l1", type=float, default=0.0)
    p.add_argument("--representation-steps", type=int, default=1)
    p.add_argument("--lr-representation", type=float, default=1e-2)
    p.add_argument("--lr-decoder", type=float, default=1e-3)
    p.add_argument("--lr-basal-gmm", type=float, default=None)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--covariate-dim", type=int, default=2)
    p.add_argument("--covariate-radius", type=float, default=2.0)
    p.add_argument("--covariate-loss-scale", default="one", choices=["one", "n_classes"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--baseline", action="store_true", help="also compute Leiden on PCA")
    p.add_argument("--compile", action="store_true", help="train with the step's dense part compiled (train(compile=True))")
    args = p.parse_args()

    path, label, cov = SETS[args.dataset]
    if path is None:
        data = atlasdgd.simulate(n_cells=args.cells, n_genes=2000, n_types=10, n_batches=4, seed=args.seed)
    else:
        data = read_input(require(path))
    model = atlasdgd.DGD(data, label_key=label, covariate_keys=[cov], latent_dim=args.latent_dim, seed=args.seed,
                         covariate_dim=args.covariate_dim, covariate_radius=args.covariate_radius,
                         covariate_loss_scale=args.covariate_loss_scale)
    t0 = time.perf_counter()
    hist = model.train(
        max_epochs=args.max_epochs, min_epochs=args.min_epochs, patience=args.patience, hyperprior=args.hyperprior,
        init=args.init, gmm_init=args.gmm_init, mixture_step=args.mixture_step, l1=args.l1, representation_steps=args.representation_steps,
        lr_representation=args.lr_representation, lr_decoder=args.lr_decoder, batch_size=args.batch_size, progress=False,
        compile=args.compile,
        **({"lr_basal_gmm": args.lr_basal_gmm} if args.lr_basal_gmm else {}),
        on_epoch=lambda r: r["epoch"] % 10 == 0 and print(
            f"epoch {r['epoch']} train {r['train_recon']:.4f} val {r.get('val_recon', float('nan')):.4f} {r['seconds']:.2f}s",
            file=sys.stderr, flush=True),
    )
    seconds = time.perf_counter() - t0
    cells = model.embed()
    train = (cells.obs["dgd_split"] == "train").to_numpy()
    obs = cells.obs[train]
    z = cells.obsm["X_dgd"][train]
    k = model.model_config.n_components
    out = {
        "dataset": args.dataset, **{k_: v for k_, v in vars(args).items() if k_ != "dataset"},
        "epochs": int(len(hist)), "best_epoch": int(hist.loc[hist["best"], "epoch"].iloc[0]) if "best" in hist else None,
        "val_recon": float(hist.loc[hist["best"], "val_recon"].iloc[0]) if "best" in hist else None,
        "seconds": round(seconds, 1), "seconds_per_epoch": round(hist["seconds"].mean(), 3),
        "ari_gmm": adjusted_rand_score(obs[label], obs["dgd_cluster"]),
        "ari_gmm_all": adjusted_rand_score(cells.obs[label], cells.obs["dgd_cluster"]),
        "used_components": int(obs["dgd_cluster"].nunique()),
        "z_std": float(z.std(0).mean()),
        "batch_mixing_dgd": batch_mixing(z, obs[cov].to_numpy(), obs[label].to_numpy()),
        # mixture occupancy from the history: cells per component after the first and the last epoch
        "component_cells_first_epoch": [int(hist[f"component_{i}_cells"].iloc[0]) for i in range(k)],
        "component_cells_last_epoch": [int(hist[f"component_{i}_cells"].iloc[-1]) for i in range(k)],
        "largest_component_over_largest_label": round(
            float(obs["dgd_cluster"].value_counts().max() / obs[label].value_counts().max()), 3),
    }
    if args.baseline:
        mod = data["rna"] if hasattr(data, "mod") else data
        pcs = log_normalised_pca(mod.X[np.flatnonzero(train)], 50, args.seed)
        out["ari_leiden_pca"] = adjusted_rand_score(obs[label], leiden_clusters(pcs, k, args.seed))
        out["batch_mixing_pca"] = batch_mixing(pcs, obs[cov].to_numpy(), obs[label].to_numpy())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
