"""The README's main command, shrunk: every output it promises is written and readable."""

import json

import anndata as ad

from atlasdgd.artifact import MANIFEST
from atlasdgd.demo import run_demo


def test_demo_writes_data_model_embeddings_plot_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = run_demo(out, n_cells=500, max_epochs=3, progress=False, workers=1)  # Ray: tests/test_ray.py
    printed = capsys.readouterr().out
    for name in ("atlas.h5mu", "atlas.zarr", "new_batch.h5mu", "model", "cells.h5ad", "mapped.h5ad", "embedding.png",
                 "metrics.json"):
        assert (out / name).exists(), name
        assert str(out / name) in printed
    assert (out / "model" / MANIFEST).exists()
    cells = ad.read_h5ad(out / "cells.h5ad")
    assert cells.n_obs == 500 and "X_dgd" in cells.obsm  # atlas + the mapped held-back batch
    mapped = ad.read_h5ad(out / "mapped.h5ad")
    assert set(mapped.obs["batch"]) == {"batch_3"} and "dgd_label" in mapped.obs
    assert (cells.obs["dgd_split"] == "mapped").sum() == mapped.n_obs
    assert 0 <= metrics["mapped_label_accuracy"] <= 1
    assert json.loads((out / "metrics.json").read_text())["epochs"] == metrics["epochs"] == 3
    assert (out / "embedding.png").read_bytes()[:4] == b"\x89PNG"
