"""A living atlas: create, update with a new batch, versions, rollback, and failures that break nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import atlasdgd
from atlasdgd.atlas import Atlas, AtlasError, VERSION_KEY
from atlasdgd.cli import main
from atlasdgd.store.sources import open_cells


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Batches 0-2 of a simulation as the atlas's first data, batch 3 as the update (cell names unique)."""
    root = tmp_path_factory.mktemp("atlas_data")
    data = atlasdgd.simulate(n_cells=1600, n_types=4, n_batches=4, n_genes=200, seed=7)
    new = (data.obs["batch"] == "batch_3").to_numpy()
    first, update = root / "first.h5ad", root / "update.h5ad"
    data[~new].copy().write_h5ad(first)
    data[new].copy().write_h5ad(update)
    return first, update, data


@pytest.fixture(scope="module")
def grown(batches, tmp_path_factory):
    """An atlas after create and one update; returns (uri, version-1 embedding taken before the update)."""
    first, update, _ = batches
    uri = str(tmp_path_factory.mktemp("atlas") / "pbmc_atlas")
    assert main(["atlas", "create", uri, str(first), "--label-key", "cell_type", "--covariate-key", "batch",
                 "--epochs", "8", "--quiet"]) == 0
    before = Atlas(uri).model(1).embed()
    assert main(["atlas", "update", uri, str(update), "--epochs", "5", "--quiet"]) == 0
    return uri, before


def test_create_then_update_gives_two_versions_with_exact_cells(grown, batches, capsys):
    uri, _ = grown
    first, update, data = batches
    capsys.readouterr()
    assert main(["atlas", "log", uri, "--json"]) == 0
    log = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_first, n_new = int((data.obs["batch"] != "batch_3").sum()), int((data.obs["batch"] == "batch_3").sum())
    assert [(r["version"], r["n_cells"], r["n_added"]) for r in log] == [(1, n_first, n_first),
                                                                        (2, n_first + n_new, n_new)]
    assert log[1]["added"]["new_classes"] == {"batch": ["batch_3"]} and log[1]["finetuned"] is False
    # the store segments hold exactly the counts of the inputs, old then new
    atlas = Atlas(uri)
    rec = atlas.record()
    expected = [data[data.obs["batch"] != "batch_3"], data[data.obs["batch"] == "batch_3"]]
    for i, (segment, part) in enumerate(zip(rec.segments, expected)):
        cells = open_cells(f"{uri}/{segment}")
        counts = cells.read_rows("rna", np.arange(cells.n_cells)).toarray()
        # the first segment is a default ([train | validation | test]) store, an update's is in its
        # input's order (its rows line up with the mapped cells' table)
        assert sorted(cells.obs.index) == sorted(part.obs_names)
        assert (list(cells.obs.index) == list(part.obs_names)) == (i == 1)
        part = part[list(cells.obs.index)]
        np.testing.assert_array_equal(counts, part.X.toarray())


def test_version_one_is_bit_identical_after_the_update_and_old_rows_are_untouched(grown, batches):
    uri, before = grown
    atlas = Atlas(uri)
    after = atlas.model(1).embed()
    np.testing.assert_array_equal(after.obsm["X_dgd"], before.obsm["X_dgd"])
    assert list(after.obs_names) == list(before.obs_names)
    latest = atlas.model().embed()
    n_old = before.n_obs
    for key in before.obsm:
        np.testing.assert_array_equal(latest.obsm[key][:n_old], before.obsm[key])
    assert (latest.obs[VERSION_KEY].to_numpy() == np.repeat([1, 2], [n_old, latest.n_obs - n_old])).all()
    added = latest.obs.iloc[n_old:]
    assert added["dgd_label_confidence"].between(0, 1).all() and added["dgd_label"].notna().all()
    # the added cells keep their own labels; the transfer agrees with most of them
    assert (added["dgd_label"].astype(str) == added["cell_type"].astype(str)).mean() > 0.8
    # the update added exactly one covariate component and kept the decoder
    v1, v2 = atlas.model(1), atlas.model(2)
    assert v2.model_config.covariates["batch"] == v1.model_config.covariates["batch"] + 1
    for name, p in v1.module.decoder.state_dict().items():
        assert bool((p == v2.module.decoder.state_dict()[name]).all()), name
    # ATLAS@N works wherever a model is taken
    out = os.path.join(os.path.dirname(uri), "v1.h5ad")
    assert main(["embed", f"{uri}@1", "--out", out]) == 0
    import anndata as ad

    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_dgd"], before.obsm["X_dgd"])


def test_rollback_makes_an_old_version_latest_without_deleting(grown):
    uri, before = grown
    atlas = Atlas(uri)
    top = atlas.latest()
    assert main(["atlas", "rollback", uri, "1"]) == 0
    assert atlas.latest() == top + 1 and atlas.record().rollback_of == 1
    np.testing.assert_array_equal(atlas.model().embed().obsm["X_dgd"], before.obsm["X_dgd"])
    assert atlas.record(top).n_cells > before.n_obs  # the rolled-back version is still there


def test_bad_updates_are_refused_before_anything_is_written(grown, batches, tmp_path):
    uri, _ = grown
    first, _, data = batches
    files = lambda: sorted(str(p) for p in __import__("pathlib").Path(uri).rglob("*"))  # noqa: E731
    before = files()
    with pytest.raises(AtlasError, match="share names"):
        Atlas(uri).update(str(first), progress=False)
    other = atlasdgd.simulate(n_cells=100, n_types=2, n_batches=1, n_genes=50, seed=1)
    other.var_names = [f"other_{i}" for i in range(other.n_vars)]
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    assert main(["atlas", "update", uri, str(path), "--quiet"]) == 2
    assert files() == before


@pytest.mark.parametrize("stage,finetune", [("append", 0), ("map", 0), ("finetune", 1), ("model", 0), ("commit", 0)])
def test_a_kill_at_any_stage_leaves_the_last_version_and_a_rerun_succeeds(batches, tmp_path, stage, finetune):
    first, update, _ = batches
    uri = str(tmp_path / "atlas")
    Atlas.create(uri, str(first), label_key="cell_type", covariate_keys=["batch"],
                 train_options={"max_epochs": 3, "min_epochs": 1}, progress=False)
    v1 = Atlas(uri).model().embed()
    env = {**os.environ, "ATLASDGD_ATLAS_FAULT": stage, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "atlasdgd.cli", "atlas", "update", uri, str(update), "--epochs", "2",
                           "--finetune", str(finetune), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 70, proc.stderr[-2000:]
    atlas = Atlas(uri)
    assert atlas.versions() == [1]
    np.testing.assert_array_equal(atlas.model().embed().obsm["X_dgd"], v1.obsm["X_dgd"])
    rec = atlas.update(str(update), epochs=2, finetune=finetune, progress=False)
    assert rec.version == 2 and atlas.versions() == [1, 2] and rec.finetuned == bool(finetune)


def test_two_updates_at_once_one_wins_the_other_is_told(grown, batches, monkeypatch):
    uri, _ = grown
    atlas = Atlas(uri)
    rec = atlas.record()
    # a second writer commits the same version number first
    clone = type(rec)(**{**rec.__dict__, "version": rec.version + 1})
    atlas._commit(clone)
    with pytest.raises(AtlasError, match="another update committed version"):
        atlas._commit(type(rec)(**{**rec.__dict__, "version": rec.version + 1}))
    assert atlas.latest() == rec.version + 1


def test_an_atlas_is_not_created_twice_and_a_missing_version_is_named(grown):
    uri, _ = grown
    with pytest.raises(AtlasError, match="already holds an atlas"):
        Atlas.create(uri, "whatever.h5ad")
    with pytest.raises(AtlasError, match="has no version 99"):
        Atlas(uri).model(99)


def test_the_whole_cycle_on_object_storage(batches, s3):
    first, update, data = batches
    uri = "s3://atlas-bucket/living_atlas"
    atlas = Atlas.create(uri, str(first), label_key="cell_type", covariate_keys=["batch"],
                         train_options={"max_epochs": 3, "min_epochs": 1}, storage_options=s3, progress=False)
    v1 = atlas.model().embed()
    rec = atlas.update(str(update), epochs=2, progress=False)
    assert rec.version == 2 and rec.n_cells == data.n_obs
    again = Atlas(uri, storage_options=s3)
    assert again.versions() == [1, 2]
    np.testing.assert_array_equal(again.model(1).embed().obsm["X_dgd"], v1.obsm["X_dgd"])
    assert again.model().embed().n_obs == data.n_obs
    assert again.rollback(1).n_cells == v1.n_obs


def test_finetune_trains_every_cell_from_where_it_was_and_keeps_version_one(batches, tmp_path):
    first, update, data = batches
    uri = str(tmp_path / "atlas")
    atlas = Atlas.create(uri, str(first), label_key="cell_type", covariate_keys=["batch"],
                         train_options={"max_epochs": 4, "min_epochs": 1}, progress=False)
    v1 = atlas.model()
    before = v1.embed()
    assert main(["atlas", "update", uri, str(update), "--epochs", "3", "--finetune", "3", "--quiet"]) == 0
    rec = atlas.record()
    assert rec.finetuned and rec.n_cells == data.n_obs and len(rec.cell_parts) == 1
    latest = atlas.model()
    cells = latest.embed()
    assert list(cells.obs_names) == list(before.obs_names) + list(data.obs_names[data.obs["batch"] == "batch_3"])
    assert (cells.obs[VERSION_KEY].to_numpy() == np.repeat([1, 2], [before.n_obs, cells.n_obs - before.n_obs])).all()
    # fine-tuning moved the old cells and the decoder (a little: 3 epochs from the trained state)
    moved = np.abs(cells.obsm["X_dgd"][: before.n_obs] - before.obsm["X_dgd"]).max(1)
    assert (moved > 0).mean() > 0.9 and np.median(moved) < 0.5 * np.abs(before.obsm["X_dgd"]).max()
    w1 = v1.module.decoder.state_dict()
    assert any(not bool((p == w1[n]).all()) for n, p in latest.module.decoder.state_dict().items())
    assert latest.model_config.covariates["batch"] == 4
    np.testing.assert_array_equal(atlas.model(1).embed().obsm["X_dgd"], before.obsm["X_dgd"])
