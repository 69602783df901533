"""`atlasdgd demo`: the whole path on a simulated RNA+ATAC atlas, in a couple of minutes.

Simulates four batches, ingests three into an atlas store, trains on it with Ray workers (as a
cluster job would), maps the held-back batch as a new covariate class (labels transferred), then
embeds and plots atlas and mapped cells together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _umap(z: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap

        return umap.UMAP(random_state=seed, n_jobs=1).fit_transform(z)
    except ImportError:  # umap-learn is optional: fall back to the first two principal components
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(z)


def run_demo(out: str | Path, n_cells: int = 4000, max_epochs: int = 200, seed: int = 0, overwrite: bool = False,
             progress: bool = True, workers: int = 2, device: str = "auto") -> dict:
    from sklearn.metrics import adjusted_rand_score

    from atlasdgd import DGD
    from atlasdgd.io.atomic import atomic_directory
    from atlasdgd.data.adapters import read_input
    from atlasdgd.evaluate.metrics import batch_mixing
    from atlasdgd.plotting import plot_embedding
    from atlasdgd.simulate import SimulationConfig, write_simulation
    from atlasdgd.store.ingest import ingest

    out = Path(out)
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite) as tmp:
        cfg = SimulationConfig(n_cells=n_cells, n_types=6, n_batches=4, n_genes=1000, n_peaks=3000, seed=seed)
        print(f"1/5 simulating {n_cells} cells: RNA ({cfg.n_genes} genes) + ATAC ({cfg.n_peaks} peaks), "
              f"{cfg.n_types} cell types, {cfg.n_batches} batches; batches 0-2 into an atlas store, batch 3 held back")
        write_simulation(cfg, str(tmp / "simulated.h5mu"), progress=progress)
        data = read_input(tmp / "simulated.h5mu")
        held = (data.obs["batch"] == "batch_3").to_numpy()
        data[~held].copy().write_h5mu(tmp / "atlas.h5mu")
        query = data[held].copy()
        query.write_h5mu(tmp / "new_batch.h5mu")
        (tmp / "simulated.h5mu").unlink()
        ingest(str(tmp / "atlas.h5mu"), str(tmp / "atlas.zarr"), label_key="cell_type", covariate_keys=["batch"],
               shuffle=True, seed=seed, progress=progress)

        if workers > 1:
            print(f"2/5 training from the store on {workers} local Ray workers (label cell_type, covariate batch)")
            from atlasdgd.distributed.ray_train import train_on_ray

            history = train_on_ray(str(tmp / "atlas.zarr"), str(tmp / "model"), workers=workers,
                                   model_options={"seed": seed}, train_options={"max_epochs": max_epochs},
                                   progress=progress)
            model = DGD.load(tmp / "model", device=device)
        else:
            print("2/5 training from the store (label cell_type, covariate batch)")
            model = DGD(str(tmp / "atlas.zarr"), seed=seed, device=device)
            history = model.train(max_epochs=max_epochs, progress=progress)

        print("3/5 mapping the held-back batch_3 as a new batch (model frozen; labels transferred)")
        mapped = model.map(query, new_covariate_classes=True, add_to_atlas=True, progress=progress)
        mapped.write_h5ad(tmp / "mapped.h5ad")
        model.save(tmp / "model", overwrite=True)

        print("4/5 embedding")
        cells = model.embed()
        cells.write_h5ad(tmp / "cells.h5ad")

        print("5/5 plotting")
        z = cells.obsm["X_dgd"]
        coords = _umap(z, seed)
        obs = cells.obs
        plot_embedding(coords, {"cell type": obs["cell_type"], "DGD cluster": obs["dgd_cluster"], "batch": obs["batch"]},
                       tmp / "embedding.png", title="DGD representation:")
        atlas = (obs["dgd_split"] != "mapped").to_numpy()
        metrics = {
            "epochs": int(len(history)),
            "ari_clusters_vs_cell_type": float(adjusted_rand_score(obs["cell_type"][atlas], obs["dgd_cluster"][atlas])),
            "batch_mixing": batch_mixing(z, obs["batch"].to_numpy(), obs["cell_type"].to_numpy()),
            "mapped_label_accuracy": float((mapped.obs["dgd_label"].astype(str).to_numpy()
                                            == query.obs["cell_type"].astype(str).to_numpy()).mean()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"\ndone in {metrics['seconds']} s: {metrics['epochs']} epochs, ARI of clusters vs cell types "
        f"{metrics['ari_clusters_vs_cell_type']:.3f}, batch mixing {metrics['batch_mixing']:.3f} (all four batches), "
        f"labels transferred to the new batch: {metrics['mapped_label_accuracy']:.1%} correct\n"
        f"  data:        {out / 'atlas.h5mu'} -> store {out / 'atlas.zarr'}; new batch {out / 'new_batch.h5mu'}\n"
        f"  model:       {out / 'model'} (loss curve: {out / 'model' / 'loss_curve.png'})\n"
        f"  embeddings:  {out / 'cells.h5ad'} (obsm X_dgd, X_dgd_batch; obs dgd_cluster, dgd_split)\n"
        f"  mapped:      {out / 'mapped.h5ad'} (batch_3: obs dgd_label, dgd_label_confidence)\n"
        f"  plot:        {out / 'embedding.png'}\n"
        f"  metrics:     {out / 'metrics.json'}"
    )
    return metrics
