"""`atlasdgd demo`: the whole path on a simulated RNA+ATAC atlas, in a couple of minutes."""

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
             progress: bool = True) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from atlasdgd import DGD
    from atlasdgd.atomic import atomic_directory
    from atlasdgd.data.adapters import read_input
    from atlasdgd.evaluate.metrics import batch_mixing
    from atlasdgd.plotting import plot_embedding
    from atlasdgd.simulate import SimulationConfig, write_simulation

    out = Path(out)
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite) as tmp:
        cfg = SimulationConfig(n_cells=n_cells, n_types=6, n_batches=3, n_genes=1000, n_peaks=3000, seed=seed)
        print(f"1/4 simulating {n_cells} cells: RNA ({cfg.n_genes} genes) + ATAC ({cfg.n_peaks} peaks), "
              f"{cfg.n_types} cell types, {cfg.n_batches} batches")
        write_simulation(cfg, str(tmp / "atlas.h5mu"), progress=progress)

        print("2/4 training (label cell_type, covariate batch; early stopping on validation cells)")
        model = DGD(read_input(tmp / "atlas.h5mu"), label_key="cell_type", covariate_keys=["batch"], seed=seed)
        history = model.train(max_epochs=max_epochs, progress=progress)
        model.save(tmp / "model")

        print("3/4 embedding")
        cells = model.embed()
        cells.write_h5ad(tmp / "cells.h5ad")

        print("4/4 plotting")
        z = cells.obsm["X_dgd"]
        coords = _umap(z, seed)
        obs = cells.obs
        plot_embedding(coords, {"cell type": obs["cell_type"], "DGD cluster": obs["dgd_cluster"], "batch": obs["batch"]},
                       tmp / "embedding.png", title="DGD representation:")
        metrics = {
            "epochs": int(len(history)),
            "ari_clusters_vs_cell_type": float(adjusted_rand_score(obs["cell_type"], obs["dgd_cluster"])),
            "batch_mixing": batch_mixing(z, obs["batch"].to_numpy(), obs["cell_type"].to_numpy()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"\ndone in {metrics['seconds']} s: {metrics['epochs']} epochs, ARI of clusters vs cell types "
        f"{metrics['ari_clusters_vs_cell_type']:.3f}, batch mixing {metrics['batch_mixing']:.3f}\n"
        f"  data:        {out / 'atlas.h5mu'}\n"
        f"  model:       {out / 'model'} (loss curve: {out / 'model' / 'loss_curve.png'})\n"
        f"  embeddings:  {out / 'cells.h5ad'} (obsm X_dgd, X_dgd_batch; obs dgd_cluster, dgd_split)\n"
        f"  plot:        {out / 'embedding.png'}\n"
        f"  metrics:     {out / 'metrics.json'}"
    )
    return metrics
