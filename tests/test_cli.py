"""The command line end to end on small simulated data, and its refusals."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from atlasdgd.cli import main


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "atlas.h5mu"
    assert main(["simulate", "--out", str(path), "--cells", "600", "--genes", "80", "--peaks", "200", "--types", "3",
                 "--batches", "2", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def model_dir(atlas):
    out = atlas.parent / "model"
    code = main(["train", str(atlas), "--out", str(out), "--label-key", "cell_type", "--covariate-key", "batch",
                 "--epochs", "3", "--min-epochs", "1", "--latent-dim", "5", "--components", "3", "--batch-size", "64",
                 "--seed", "2", "--gmm-init", "kmeans", "--quiet"])
    assert code == 0
    return out


def test_train_writes_a_complete_model(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"atlasdgd.json", "weights.safetensors", "cells.zarr", "history.csv", "loss_curve.png"} <= names
    import pandas as pd

    assert len(pd.read_csv(model_dir / "history.csv")) == 3


def test_embed_writes_representations_clusters_and_split(model_dir, tmp_path):
    out = tmp_path / "cells.h5ad"
    assert main(["embed", str(model_dir), "--out", str(out)]) == 0
    cells = ad.read_h5ad(out)
    assert cells.n_obs == 600
    assert cells.obsm["X_dgd"].shape == (600, 5) and cells.obsm["X_dgd_batch"].shape == (600, 2)
    assert set(cells.obs["dgd_split"]) == {"train", "validation", "test"}
    assert cells.obs["dgd_cluster"].astype(int).between(0, 2).all()


def test_outputs_are_not_overwritten_without_asking(model_dir, atlas, capsys):
    code = main(["train", str(atlas), "--out", str(model_dir), "--epochs", "1", "--quiet"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_counts_are_refused_and_nothing_is_written(tmp_path, capsys):
    bad = ad.AnnData(X=sparse.csr_matrix(np.full((10, 4), 0.5, dtype=np.float32)))
    bad.write_h5ad(tmp_path / "bad.h5ad")
    code = main(["train", str(tmp_path / "bad.h5ad"), "--out", str(tmp_path / "m"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "non-integer" in err and "raw count" in err
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


def test_missing_inputs(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "nomodel"), "--out", str(tmp_path / "c.h5ad")]) == 2
    assert "no model directory" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m"), "--quiet"]) == 2


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "atlasdgd.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("simulate", "train", "embed", "demo"):
        assert cmd in out.stdout
    train_help = subprocess.run([sys.executable, "-m", "atlasdgd.cli", "train", "--help"], capture_output=True, text=True).stdout
    for flag in ("--label-key", "--covariate-key", "--epochs", "--seed", "--latent-dim", "--components", "--batch-size"):
        assert flag in train_help
