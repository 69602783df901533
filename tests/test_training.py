"""Training quality on simulated data with known truth (the model, not a stub, must learn)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import atlasdgd
from atlasdgd import DGD
from atlasdgd.evaluate.metrics import batch_mixing, kmeans_clusters, log_normalised_pca


@pytest.fixture(scope="module")
def atlas():
    # strong batch effects (sd 1 log fold change per gene and batch) that PCA cannot see past
    return atlasdgd.simulate(n_cells=5000, n_types=8, n_batches=3, n_genes=1000, batch_effect=1.0, seed=0)


@pytest.fixture(scope="module")
def trained(atlas):
    model = DGD(atlas, label_key="cell_type", covariate_keys=["batch"], seed=0)
    model.train(max_epochs=40, min_epochs=40, progress=False)
    return model


def test_mixture_clusters_recover_cell_types_and_beat_pca_kmeans(atlas, trained):
    cells = trained.embed()
    ari_dgd = adjusted_rand_score(atlas.obs["cell_type"], cells.obs["dgd_cluster"])
    pcs = log_normalised_pca(atlas.X, 20)
    ari_pca = adjusted_rand_score(atlas.obs["cell_type"], kmeans_clusters(pcs, 8))
    assert ari_dgd >= 0.9, ari_dgd
    assert ari_dgd > ari_pca, (ari_dgd, ari_pca)


def test_held_out_cells_are_clustered_as_well(atlas, trained):
    cells = trained.embed()
    for split in ("validation", "test"):
        sel = (cells.obs["dgd_split"] == split).to_numpy()
        assert sel.sum() > 400
        assert adjusted_rand_score(atlas.obs["cell_type"][sel], cells.obs["dgd_cluster"][sel]) >= 0.85, split


def test_basal_representation_mixes_batches_better_than_pca(atlas, trained):
    cells = trained.embed()
    types, batches = atlas.obs["cell_type"].to_numpy(), atlas.obs["batch"].to_numpy()
    mix_dgd = batch_mixing(cells.obsm["X_dgd"], batches, types)
    mix_pca = batch_mixing(log_normalised_pca(atlas.X, 20), batches, types)
    assert mix_dgd > mix_pca + 0.1, (mix_dgd, mix_pca)


def test_covariate_representation_carries_the_batch(atlas, trained):
    cells = trained.embed()
    zb = cells.obsm["X_dgd_batch"]
    assert adjusted_rand_score(atlas.obs["batch"], kmeans_clusters(zb, 3)) > 0.95


def test_components_do_not_collapse(trained):
    """Every component keeps cells and the means stay apart (the reference collapses to one)."""
    cells = trained.embed()
    counts = cells.obs["dgd_cluster"].value_counts()
    assert (counts > 100).sum() == 8
    means = trained.module.basal.means.detach()
    dist = torch.cdist(means, means) + torch.eye(8) * 1e9
    z = torch.from_numpy(cells.obsm["X_dgd"])
    assert dist.min() > 3 * z.std(0).min()
    assert z.std(0).max() > 0.1  # representations left the origin


def test_training_reduces_validation_loss_and_keeps_the_best(trained):
    h = trained.history
    assert h["val_recon"].iloc[-1] < h["val_recon"].iloc[0]
    assert h["best"].sum() == 1
    assert h.loc[h["best"], "val_recon"].iloc[0] == h["val_recon"].min()


def test_components_carry_their_majority_label(trained):
    labels = trained.vocab.component_labels
    assert sorted(labels) == sorted(trained.vocab.labels)  # one component per type


def test_training_is_reproducible(atlas):
    small = atlas[:600].copy()
    runs = []
    for _ in range(2):
        m = DGD(small, label_key="cell_type", covariate_keys=["batch"], seed=3)
        m.train(max_epochs=3, min_epochs=3, heldout_epochs=1, progress=False)
        runs.append(m.representation)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_history_records_each_components_cells_and_weight(atlas):
    small = atlas[:600].copy()
    m = DGD(small, label_key="cell_type", covariate_keys=["batch"], seed=1)
    history = m.train(max_epochs=2, min_epochs=2, heldout_epochs=1, progress=False)
    k = m.model_config.n_components
    cells = history[[f"component_{i}_cells" for i in range(k)]].to_numpy()
    weights = history[[f"component_{i}_weight" for i in range(k)]].to_numpy()
    n_train = int((m.cells.obs["dgd_split"] == "train").sum())
    assert (cells.sum(1) == n_train).all()  # every training cell counted once per epoch
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    final = np.bincount(m.cells.obs["dgd_cluster"].to_numpy()[(m.cells.obs["dgd_split"] == "train").to_numpy()],
                        minlength=k)
    assert np.abs(cells[-1] - final).sum() <= 0.1 * n_train  # the last epoch's count is close to the end state


def test_em_mixture_step_moves_the_mixture_once_per_epoch_without_an_optimiser():
    data = atlasdgd.simulate(n_cells=1500, n_types=4, n_batches=2, n_genes=200, seed=2)
    model = DGD(data, label_key="cell_type", covariate_keys=["batch"], seed=0)
    seen = []
    hist = model.train(max_epochs=6, min_epochs=6, progress=False, mixture_step="em",
                       on_epoch=lambda row: seen.append(model.module.basal.means.detach().clone()))
    assert "components_reseeded" in hist and (hist["components_reseeded"] == 0).all()
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))  # the M-step ran every epoch
    cells = model.embed()
    assert adjusted_rand_score(data.obs["cell_type"], cells.obs["dgd_cluster"]) > 0.9
    # the weights are the M-step's: the share of each component's responsibility mass
    z = torch.as_tensor(cells.obsm["X_dgd"][(cells.obs["dgd_split"] == "train").to_numpy()])
    basal = model.module.basal
    mass = basal.posterior(z).sum(0) / len(z)
    np.testing.assert_allclose(torch.exp(basal.log_weights()).detach().numpy(), mass.detach().numpy(), atol=0.05)
