"""map / predict / perturb / sample / evaluate from the command line, and what they refuse."""

import json
import shutil

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from atlasdgd.cli import main
from atlasdgd.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_query")
    data = simulate(SimulationConfig(n_cells=700, n_types=3, n_batches=3, n_genes=80, n_peaks=200, n_linked_genes=5,
                                     peaks_per_linked_gene=4, seed=4))
    held = (data.obs["batch"] == "batch_2").to_numpy()
    data[~held].copy().write_h5mu(root / "atlas.h5mu")
    query = data[held].copy()
    query.write_h5mu(root / "query.h5mu")
    rna = query["rna"].copy()
    rna.obs = query.obs.copy()
    rna.write_h5ad(root / "query_rna.h5ad")
    data.write_h5mu(root / "all.h5mu")
    model = root / "model"
    assert main(["train", str(root / "atlas.h5mu"), "--out", str(model), "--label-key", "cell_type", "--covariate-key",
                 "batch", "--epochs", "5", "--min-epochs", "1", "--latent-dim", "5", "--quiet"]) == 0
    return root


def _no_leftovers(folder):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_map_writes_representations_labels_and_an_extended_model(files, tmp_path):
    out, saved = tmp_path / "mapped.h5ad", tmp_path / "model2"
    assert main(["map", str(files / "model"), str(files / "query.h5mu"), "--out", str(out), "--epochs", "2",
                 "--new-covariate-classes", "--save-model", str(saved), "--add-to-atlas", "--quiet"]) == 0
    mapped = ad.read_h5ad(out)
    assert {"dgd_cluster", "dgd_label", "dgd_label_confidence", "dgd_batch"} <= set(mapped.obs.columns)
    assert mapped.obsm["X_dgd"].shape[1] == 5
    manifest = json.loads((saved / "atlasdgd.json").read_text())
    assert manifest["vocabulary"]["covariates"]["batch"][-1] == "batch_2"
    assert manifest["n_cells"] == 700


def test_predict_writes_every_modality_with_means_and_dispersions(files, tmp_path):
    out = tmp_path / "pred.h5mu"
    assert main(["predict", str(files / "model"), str(files / "query_rna.h5ad"), "--out", str(out), "--epochs", "2",
                 "--quiet"]) == 0
    pred = mudata.read_h5mu(out)
    atac = pred["atac"]
    assert atac.shape[1] == 200 and "dgd_mean" in atac.layers and "dgd_dispersion" in atac.var
    assert (atac.obs["dgd_library_source"].astype(str) == "from rna").all()
    np.testing.assert_allclose(np.asarray(atac.X).sum(1), 1.0, rtol=1e-4)
    flat = tmp_path / "pred.h5ad"
    assert main(["predict", str(files / "model"), str(files / "query_rna.h5ad"), "--out", str(flat), "--epochs", "1",
                 "--quiet"]) == 0
    both = ad.read_h5ad(flat)
    assert both.shape[1] == 280 and set(both.var["dgd_modality"]) == {"rna", "atac"}
    assert {"dgd_library_rna", "dgd_library_atac"} <= set(both.obs.columns)


def test_perturb_writes_a_table_with_tss_distances(files, tmp_path):
    out = tmp_path / "delta.parquet"
    var = ad.read_h5ad(files / "query_rna.h5ad").var
    gene = var.index[var["linked_peaks"] > 0][0]
    assert main(["perturb", str(files / "model"), str(files / "query.h5mu"), "--gene", f"{gene},gene_00001",
                 "--group-by", "cell_type", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    table = pd.read_parquet(out)
    assert set(table["gene"]) == {gene, "gene_00001"}
    assert {"group", "modality", "feature", "mean_delta", "n_cells", "distance_to_tss"} <= set(table.columns)


def test_sample_and_evaluate(files, tmp_path):
    out = tmp_path / "synthetic.h5mu"
    assert main(["sample", str(files / "model"), "--cells", "20", "--component", "0", "--covariate", "batch=batch_1",
                 "--library", "rna=500", "--out", str(out)]) == 0
    synth = mudata.read_h5mu(out)
    assert synth["rna"].n_obs == 20 and (synth["rna"].obs["batch"] == "batch_1").all()
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(files / "model"), str(files / "all.h5mu"), "--label-key", "cell_type", "--batch-key",
                 "batch", "--predict-modality", "atac", "--epochs", "1", "--out", str(metrics), "--quiet"]) == 0
    m = json.loads(metrics.read_text())
    assert {"ari", "nmi", "batch_mixing", "label_silhouette", "heldout", "predicted"} <= set(m)
    assert "auprc" in m["heldout"]["atac"] and "rmse" in m["heldout"]["rna"]


def _write(tmp_path, name, x, var_names):
    a = ad.AnnData(X=sparse.csr_matrix(x.astype(np.float32)), var=pd.DataFrame(index=var_names))
    a.obs_names = [f"q{i}" for i in range(x.shape[0])]
    path = tmp_path / name
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize("command", ["map", "predict", "perturb", "evaluate"])
def test_bad_queries_are_refused_with_a_message_and_nothing_written(files, tmp_path, capsys, command):
    genes = [f"gene_{i:05d}" for i in range(80)]
    rng = np.random.default_rng(0)
    cases = {
        "share no names": _write(tmp_path, "renamed.h5ad", rng.poisson(2, (5, 80)), [f"x{i}" for i in range(80)]),
        "negative": _write(tmp_path, "negative.h5ad", -np.ones((5, 80)), genes),
        "non-integer": _write(tmp_path, "fraction.h5ad", np.full((5, 80), 0.5), genes),
    }
    suffix = {"map": ".h5ad", "predict": ".h5mu", "perturb": ".csv", "evaluate": ".json"}[command]
    extra = ["--gene", "gene_00000"] if command == "perturb" else []
    for message, path in cases.items():
        out = tmp_path / f"out{suffix}"
        assert main([command, str(files / "model"), str(path), "--out", str(out), "--quiet", *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    good = files / "query_rna.h5ad"
    out = tmp_path / f"out{suffix}"
    # wrong modality
    assert main([command, str(files / "model"), str(good), "--modality", "protein", "--out", str(out), "--quiet", *extra]) == 2
    assert "not in the model" in capsys.readouterr().err
    # missing model files, torn model, corrupted weights
    assert main([command, str(tmp_path / "nowhere"), str(good), "--out", str(out), "--quiet", *extra]) == 2
    assert "no model directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(files / "model", broken)
    (broken / "weights.safetensors").write_bytes(b"not a safetensors file")
    assert main([command, str(broken), str(good), "--out", str(out), "--quiet", *extra]) == 2
    assert "corrupted" in capsys.readouterr().err
    (broken / "atlasdgd.json").unlink()
    assert main([command, str(broken), str(good), "--out", str(out), "--quiet", *extra]) == 2
    assert "not a complete atlasdgd model" in capsys.readouterr().err
    assert not out.exists() and _no_leftovers(tmp_path)


def test_map_writes_label_probabilities_and_unknown_below_a_confidence(files, tmp_path, capsys):
    plain, unsure = tmp_path / "plain.h5ad", tmp_path / "unsure.h5ad"
    args = ["map", str(files / "model"), str(files / "query.h5mu"), "--epochs", "1", "--quiet"]
    assert main(args + ["--out", str(plain)]) == 0
    mapped = ad.read_h5ad(plain)
    probs = mapped.obsm["dgd_label_probabilities"]
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, rtol=1e-5)
    conf = mapped.obs["dgd_label_confidence"].to_numpy()
    threshold = float(np.unique(conf)[len(np.unique(conf)) // 2]) if len(np.unique(conf)) > 1 else 1.0
    assert main(args + ["--out", str(unsure), "--unknown-below", str(threshold)]) == 0
    labels = ad.read_h5ad(unsure).obs["dgd_label"].astype(str).to_numpy()
    low = conf < threshold
    assert (labels[low] == "unknown").all()
    assert (labels[~low] == mapped.obs["dgd_label"].astype(str).to_numpy()[~low]).all()
    assert main(args + ["--out", str(tmp_path / "x.h5ad"), "--unknown-below", "2"]) == 2
    assert "--unknown-below" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()
