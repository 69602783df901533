import json

import numpy as np
import pytest
import torch

import atlasdgd
from atlasdgd import DGD
from atlasdgd.artifact import MANIFEST, WEIGHTS
from atlasdgd.errors import AtlasDGDError, ModelFileError


@pytest.fixture(scope="module")
def trained():
    data = atlasdgd.simulate(n_cells=400, n_genes=60, n_types=3, n_batches=2, seed=1)
    model = DGD(data, label_key="cell_type", covariate_keys=["batch"], latent_dim=4, seed=1)
    model.train(max_epochs=4, min_epochs=1, heldout_epochs=2, progress=False)
    return model


def test_round_trip_reproduces_representations_and_predictions(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.representation, trained.representation)
    z = trained.representation[:50]
    for m, v in trained.log_fractions(z).items():
        np.testing.assert_array_equal(loaded.log_fractions(z)[m], v)
    np.testing.assert_array_equal(loaded.cluster(z[:, :4]), trained.cluster(z[:, :4]))
    for k, v in trained.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v), k
    a, b = trained.embed(), loaded.embed()
    assert a.obs.equals(b.obs)
    assert loaded.vocab == trained.vocab
    assert loaded.model_config == trained.model_config
    assert len(loaded.history) == len(trained.history)


def test_model_directory_has_no_pickle_and_is_self_describing(trained, tmp_path):
    trained.save(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {MANIFEST, WEIGHTS, "cells.zarr", "history.csv", "loss_curve.png"} <= names
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format"] == "atlasdgd-model" and manifest["vocabulary"]["covariates"]["batch"] == ["batch_0", "batch_1"]
    assert not any(p.suffix in {".pkl", ".pt", ".pickle"} for p in (tmp_path / "m").rglob("*"))
    import anndata as ad

    cells = ad.read_zarr(tmp_path / "m" / "cells.zarr")  # readable by plain anndata
    assert cells.obsm["X_dgd"].shape == (400, 4)


def test_save_refuses_to_overwrite_unless_asked(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(AtlasDGDError, match="already exists.*overwrite"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    assert DGD.load(tmp_path / "m").cells.n_obs == 400


def test_failed_save_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    import atlasdgd.plotting

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(atlasdgd.plotting, "plot_history", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        trained.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_missing_model(tmp_path):
    with pytest.raises(ModelFileError, match="no model directory"):
        DGD.load(tmp_path / "nothing")


def test_torn_model_without_manifest(trained, tmp_path):
    trained.save(tmp_path / "m")
    (tmp_path / "m" / MANIFEST).unlink()
    with pytest.raises(ModelFileError, match="not a complete atlasdgd model"):
        DGD.load(tmp_path / "m")


def test_corrupted_weights(trained, tmp_path):
    trained.save(tmp_path / "m")
    w = tmp_path / "m" / WEIGHTS
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="missing or corrupted"):
        DGD.load(tmp_path / "m")


def test_wrong_format_version(trained, tmp_path):
    trained.save(tmp_path / "m")
    mf = tmp_path / "m" / MANIFEST
    manifest = json.loads(mf.read_text())
    manifest["format_version"] = 99
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="format version 99"):
        DGD.load(tmp_path / "m")


def test_loaded_model_cannot_train_without_data(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(AtlasDGDError, match="no training data"):
        DGD.load(tmp_path / "m").train()


def test_cell_table_embeddings_are_column_views_of_one_array(trained):
    """The trained cell table's obsm arrays are views of the run's [cells, D] representations, not
    copies (copies cost ~100 MB at the end of a million-cell run); they round-trip like arrays."""
    basal, batch = trained.cells.obsm["X_dgd"], trained.cells.obsm["X_dgd_batch"]
    assert np.may_share_memory(basal, batch) and not basal.flags["OWNDATA"]
    np.testing.assert_array_equal(np.concatenate([basal, batch], axis=1), trained.representation)
