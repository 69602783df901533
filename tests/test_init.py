import numpy as np
import pytest
import torch
from scipy import sparse

from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import Batch, DGDModule
from atlasdgd.infer.candidates import candidate_search
from atlasdgd.train.early_stopping import EarlyStopping
from atlasdgd.train.init import mixture_start, pca_representations


def test_pca_start_removes_batch_offsets_and_keeps_types():
    rng = np.random.default_rng(0)
    n, f = 2000, 200
    types = rng.integers(0, 2, n)
    batches = rng.integers(0, 2, n)
    log_mu = np.log(5) + 1.5 * np.outer(types, rng.normal(size=f)) + 2.0 * np.outer(batches, rng.normal(size=f))
    x = sparse.csr_matrix(rng.poisson(np.exp(log_mu)).astype(np.float32))
    z = pca_representations({"rna": x}, batches, dim=5, radius=2.0, seed=0)
    assert z.shape == (n, 5)
    assert np.linalg.norm(z, axis=1).mean() == pytest.approx(1.0, rel=1e-5)  # scaled to radius / 2
    pc1 = z[:, 0]
    type_gap = abs(pc1[types == 1].mean() - pc1[types == 0].mean())
    batch_gap = abs(pc1[batches == 1].mean() - pc1[batches == 0].mean())
    assert type_gap > 10 * batch_gap
    # without batch centring the batch effect would dominate
    z_raw = pca_representations({"rna": x}, np.zeros(n), dim=5, radius=2.0, seed=0)
    raw_gap = abs(z_raw[batches == 1, 0].mean() - z_raw[batches == 0, 0].mean())
    assert raw_gap > abs(z_raw[types == 1, 0].mean() - z_raw[types == 0, 0].mean())


def test_pca_start_is_fitted_on_training_cells_only():
    rng = np.random.default_rng(1)
    x = sparse.csr_matrix(rng.poisson(3.0, (300, 40)).astype(np.float32))
    mask = np.zeros(300, bool)
    mask[:200] = True
    a = pca_representations({"rna": x}, np.zeros(300), 4, 2.0, fit_mask=mask)
    x2 = x.toarray()
    x2[250:] = rng.poisson(3.0, (50, 40)) * (np.arange(40) % 3 == 0)  # other held-out cells
    b = pca_representations({"rna": sparse.csr_matrix(x2)}, np.zeros(300), 4, 2.0, fit_mask=mask)
    np.testing.assert_allclose(b[:250], a[:250], rtol=1e-4, atol=1e-6)  # unchanged cells, unchanged scores
    assert not np.allclose(b[250:], a[250:])


def _dense_pca_reference(counts: dict, groups, fit, dim, radius):
    """The batch-centred PCA start written densely with numpy's SVD, for comparison."""
    parts, fitted = [], []
    for x in counts.values():
        x = x.toarray().astype(np.float64)
        lib = x.sum(1)
        target = np.median(lib[fit][lib[fit] > 0])
        y = np.log1p(x * (target / lib)[:, None])
        total = y[fit].var(axis=0).sum()
        parts.append(y / np.sqrt(total))
    y = np.hstack(parts)
    centred = y.copy()
    for g in np.unique(groups):
        centred[groups == g] -= y[fit & (groups == g)].mean(0)
    _, _, vt = np.linalg.svd(centred[fit], full_matrices=False)
    z = centred @ vt[:dim].T
    return z * (0.5 * radius / np.linalg.norm(z[fit], axis=1).mean())


@pytest.mark.parametrize("block_cells", [7, 2048])
def test_pca_start_matches_a_dense_svd_whatever_the_block_size(block_cells):
    from atlasdgd.train.init import _CountsSource, pca_start

    rng = np.random.default_rng(4)
    n = 240
    groups = rng.integers(0, 3, n)
    types = rng.integers(0, 3, n)
    counts = {
        "rna": sparse.csr_matrix(rng.poisson(np.exp(0.5 + np.outer(types, rng.normal(size=30)))).astype(np.float32)),
        "atac": sparse.csr_matrix(rng.poisson(0.3 + np.outer(types == 1, rng.random(50))).astype(np.float32)),
    }
    fit = np.ones(n, bool)
    fit[200:] = False  # held-out cells are projected, not fitted
    z = pca_start(_CountsSource(counts), groups, 4, 3.0, seed=0, fit_mask=fit, block_cells=block_cells)
    reference = _dense_pca_reference(counts, groups, fit, 4, 3.0)
    reference *= np.sign((reference * z).sum(0))  # an axis' sign is arbitrary (ARPACK's vs LAPACK's)
    np.testing.assert_allclose(z, reference, rtol=1e-4, atol=1e-5)


def test_mixture_start_from_labels_gives_class_moments():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [100, 300, 600])
    z = rng.normal(size=(1000, 3)) + labels[:, None] * 5
    means, variances, weights = mixture_start(z, 3, "labels", labels)
    for c in range(3):
        np.testing.assert_allclose(means[c], z[labels == c].mean(0), rtol=1e-5)
        np.testing.assert_allclose(variances[c], z[labels == c].var(0), rtol=1e-5)
    np.testing.assert_allclose(weights, [0.1, 0.3, 0.6])


@pytest.mark.parametrize("method", ["kmeans", "leiden"])
def test_mixture_start_unsupervised_finds_separated_blobs(method):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 900)
    z = rng.normal(scale=0.3, size=(900, 2)) + np.array([[0, 0], [5, 0], [0, 5]])[truth]
    means, _, weights = mixture_start(z, 3, method, seed=0)
    found = sorted(map(tuple, np.round(means).astype(int)))
    assert found == [(0, 0), (0, 5), (5, 0)]
    assert weights.sum() == pytest.approx(1.0)


def test_mixture_start_refuses_labels_without_them():
    with pytest.raises(ValueError, match="label"):
        mixture_start(np.zeros((10, 2)), 2, "labels", None)


def test_candidate_search_picks_the_component_with_the_lowest_loss():
    cfg = ModelConfig(modalities={"rna": 20}, latent_dim=3, n_components=5, covariates={"batch": 2})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(7, 20, generator=g) * 4)
    x[:, 0] += 1
    codes = torch.tensor([[0], [1], [0], [1], [1], [0], [0]])
    batch = Batch(torch.arange(7), {"rna": x}, {"rna": x.sum(1)}, codes)
    starts, losses = candidate_search(module, [batch], 7, keep=2)
    with torch.no_grad():
        cand = []
        for k in range(5):
            z = torch.cat([module.basal.means[k].expand(7, -1), module.covariate_gmms["batch"].means[codes[:, 0]]], 1)
            cand.append(module.losses(batch, z).per_cell())
        cand = torch.stack(cand, 1)
    order = cand.argsort(1)
    torch.testing.assert_close(starts[:, 0, :3], module.basal.means.detach()[order[:, 0]])
    torch.testing.assert_close(starts[:, 1, :3], module.basal.means.detach()[order[:, 1]])
    torch.testing.assert_close(losses, cand.gather(1, order[:, :2]))
    torch.testing.assert_close(starts[:, 0, 3:], module.covariate_gmms["batch"].means.detach()[codes[:, 0]])


def test_candidate_search_over_unknown_covariates_scores_every_combination():
    cfg = ModelConfig(modalities={"rna": 15}, latent_dim=2, n_components=3, covariates={"batch": 2, "donor": 3})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.poisson(torch.rand(6, 15, generator=torch.Generator().manual_seed(2)) * 4) + 1
    codes = torch.tensor([[-1, 2], [1, -1], [-1, -1], [0, 0], [-1, 1], [1, -1]])
    batch = Batch(torch.arange(6), {"rna": x}, {"rna": x.sum(1)}, codes)
    starts, losses = candidate_search(module, [batch], 6)
    gb, gd = module.covariate_gmms["batch"], module.covariate_gmms["donor"]
    with torch.no_grad():
        best = torch.full((6,), float("inf"))
        for k in range(3):
            for b in range(2):
                for d in range(3):
                    bb = torch.where(codes[:, 0] >= 0, codes[:, 0], torch.tensor(b))
                    dd = torch.where(codes[:, 1] >= 0, codes[:, 1], torch.tensor(d))
                    z = torch.cat([module.basal.means[k].expand(6, -1), gb.means[bb], gd.means[dd]], 1)
                    best = torch.minimum(best, module.losses(batch, z).per_cell())
        np.testing.assert_allclose(losses[:, 0].numpy(), best.numpy(), rtol=1e-6)
        # known classes are kept; the chosen start reproduces its loss
        torch.testing.assert_close(starts[3, 0, 2:4], gb.means[0])
        torch.testing.assert_close(module.losses(batch, starts[:, 0]).per_cell(), losses[:, 0])


def test_early_stopping_waits_for_min_epochs_and_patience():
    stop = EarlyStopping(min_epochs=5, patience=2)
    values = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 1.0, 1.5, 1.6]
    stopped = None
    for epoch, v in enumerate(values):
        stop.update(epoch, v)
        if stop.should_stop(epoch):
            stopped = epoch
            break
    assert stopped == 4  # no improvement since epoch 1, and epoch 4 completes the minimum of 5
    assert stop.best_epoch == 1 and stop.best == 2.0
