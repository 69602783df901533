"""Mapping new cells: feature alignment, unknown covariates, candidate search memory, new classes, labels."""

import gc

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse, stats

from atlasdgd import DGD
from atlasdgd.errors import InputError
from atlasdgd.infer.candidates import candidate_search, chunk_cells
from atlasdgd.infer.labels import transfer_labels
from atlasdgd.infer.query import align_query
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule


def _rna_only(mdata, drop_obs=()):
    rna = mdata["rna"].copy()
    rna.obs = mdata.obs.drop(columns=list(drop_obs)).copy()
    return rna


def test_unmeasured_features_are_left_out_of_the_likelihood_not_read_as_zeros():
    cfg = ModelConfig(modalities={"rna": 30}, latent_dim=3, n_components=2)
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.log_dispersion["rna"].copy_(torch.linspace(-1, 1, 30))
    rng = np.random.default_rng(0)
    names = [f"g{i}" for i in range(30)]
    keep = rng.permutation(30)[:20]  # the query measures 20 of the 30 features, shuffled, plus 5 unknown ones
    x = rng.poisson(3.0, (6, 25)).astype(np.float32)
    query = ad.AnnData(X=sparse.csr_matrix(x), var=pd.DataFrame(index=[names[i] for i in keep] + [f"new{i}" for i in range(5)]))
    query.obs_names = [f"c{i}" for i in range(6)]
    aligned = align_query(query, {"rna": names}, {})
    batch = next(iter(aligned.loader(np.arange(6), 6, shuffle=False)))
    z = torch.randn(6, cfg.representation_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = module.losses(batch, z).reconstruction["rna"].numpy()
        y = torch.softmax(module.decoder(z)["rna"], 1).numpy().astype(np.float64)
        r = module.dispersion("rna").numpy().astype(np.float64)
    measured = np.sort(keep)
    counts = np.zeros((6, 30))
    counts[:, keep] = x[:, :20]
    xm = counts[:, measured]
    y_m = y[:, measured] / y[:, measured].sum(1, keepdims=True)  # renormalised over measured features
    mu = y_m * xm.sum(1, keepdims=True)
    expected = -stats.nbinom.logpmf(xm, r[measured], r[measured] / (r[measured] + mu)).sum(1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_unknown_covariate_scores_the_mixture_marginal():
    cfg = ModelConfig(modalities={"rna": 5}, latent_dim=2, n_components=1, covariates={"batch": 3})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    gmm = module.covariate_gmms["batch"]
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    codes = torch.tensor([0, -1, 2, -1])
    with torch.no_grad():
        got = module._covariate_log_prob(gmm, z, codes).numpy()
        w = torch.softmax(gmm.logits, 0).numpy()
        var = torch.exp(-gmm.log_precision).numpy().ravel()
        mu = gmm.means.numpy()
    dens = np.stack([w[c] * stats.multivariate_normal(mu[c], var[c] * np.eye(2)).pdf(z.numpy()) for c in range(3)], 1)
    expected = np.log(np.where(codes.numpy()[:, None] >= 0, np.take_along_axis(dens, codes.clamp_min(0).numpy()[:, None], 1), dens.sum(1, keepdims=True))).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_query_alignment_rejects_what_cannot_be_mapped():
    names = [f"g{i}" for i in range(10)]

    def query(var_names, x=None):
        x = np.ones((3, len(var_names)), np.float32) if x is None else x
        a = ad.AnnData(X=sparse.csr_matrix(x), var=pd.DataFrame(index=var_names))
        a.obs_names = ["a", "b", "c"]
        return a

    with pytest.raises(InputError, match="share no names"):
        align_query(query([f"x{i}" for i in range(10)]), {"rna": names}, {})
    with pytest.raises(InputError, match="only 3 of the model's 10"):
        align_query(query(names[:3]), {"rna": names}, {})
    assert len(align_query(query(names[:3]), {"rna": names}, {}, min_overlap=0.2).features["rna"]) == 3
    with pytest.raises(InputError, match="not in the model"):
        align_query(query(names), {"rna": names}, {}, modality="atac")
    with pytest.raises(InputError, match="negative"):
        align_query(query(names, -np.ones((3, 10), np.float32)), {"rna": names}, {})
    with pytest.raises(InputError, match="non-integer"):
        align_query(query(names, np.full((3, 10), 0.5, np.float32)), {"rna": names}, {})


def test_covariate_codes_use_known_classes_and_mark_the_rest_unknown():
    a = ad.AnnData(X=sparse.csr_matrix(np.ones((4, 2), np.float32)), var=pd.DataFrame(index=["g0", "g1"]))
    a.obs_names = list("abcd")
    a.obs["batch"] = ["b1", "new", None, "b0"]
    q = align_query(a, {"rna": ["g0", "g1"]}, {"batch": ["b0", "b1"], "donor": ["d0"]})
    np.testing.assert_array_equal(q.covariates, [[1, -1], [-1, -1], [-1, -1], [0, -1]])
    assert q.unseen_classes == {"batch": ["new"]}


def test_mapping_training_cells_lands_them_in_their_trained_clusters(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    trained = model.embed()
    train_cells = trained.obs_names[trained.obs["dgd_split"] == "train"]
    query = mapped_atlas.train[train_cells].copy()
    query.obs = query.obs.drop(columns=["batch"])  # covariates unknown: searched over all classes
    mapped = model.map(query, progress=False)
    assert (mapped.obs["dgd_cluster"].to_numpy() == trained[train_cells].obs["dgd_cluster"].to_numpy()).mean() >= 0.95
    # the covariate search finds each cell's own batch
    truth = mapped_atlas.train[train_cells].obs["batch"].astype(str).to_numpy()
    assert (mapped.obs["dgd_batch"].astype(str).to_numpy() == truth).mean() >= 0.9
    # and lands near the trained representation relative to the spread of the atlas
    gap = np.linalg.norm(mapped.obsm["X_dgd"] - trained[train_cells].obsm["X_dgd"], axis=1)
    spread = np.linalg.norm(trained.obsm["X_dgd"] - trained.obsm["X_dgd"].mean(0), axis=1)
    assert np.median(gap) < 0.5 * np.median(spread)


def test_labels_transfer_to_a_held_out_batch(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    mapped = model.map(mapped_atlas.heldout, progress=False)
    truth = mapped_atlas.heldout.obs["cell_type"].astype(str).to_numpy()
    assert (mapped.obs["dgd_label"].astype(str).to_numpy() == truth).mean() >= 0.9
    conf = mapped.obs["dgd_label_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1 + 1e-6)).all()


def test_transfer_labels_sums_posterior_mass_per_label():
    post = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.35, 0.25, 0.4]])
    labels, conf = transfer_labels(post, ["T", "B", "T"])
    assert list(labels) == ["T", "T", "T"]
    np.testing.assert_allclose(conf, [0.7, 0.9, 0.75])
    labels, conf = transfer_labels(post, ["T", "B", None])
    assert list(labels) == ["T", "B", "T"]
    np.testing.assert_allclose(conf, [0.5, 0.1, 0.35])


def _peak_rss_during(fn) -> int:
    """Increase of the resident-set high-water mark while ``fn`` runs (Linux), in bytes."""
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_candidate_search_memory_stays_under_budget_when_the_query_grows_10x():
    cfg = ModelConfig(modalities={"rna": 2000}, latent_dim=8, n_components=4, covariates={"batch": 4})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    budget = 12 * 2**20
    chunk = chunk_cells(module, budget)
    rng = np.random.default_rng(0)

    def query(n):
        x = sparse.random(n, 2000, density=0.05, format="csr", random_state=rng, dtype=np.float32)
        x.data = np.ceil(x.data * 5)
        a = ad.AnnData(X=x, var=pd.DataFrame(index=[f"g{i}" for i in range(2000)]))
        a.obs_names = [f"c{i}" for i in range(n)]
        return align_query(a, {"rna": a.var_names.tolist()}, {"batch": ["0", "1", "2", "3"]})

    warm = query(5)  # one-time torch/OpenMP initialisation is not the search's memory
    candidate_search(module, warm.loader(np.arange(5), chunk, shuffle=False), 5)
    peaks = {}
    for n in (300, 3000):
        q = query(n)
        loader = q.loader(np.arange(n), chunk, shuffle=False)
        peaks[n] = _peak_rss_during(lambda: candidate_search(module, loader, n))
    # the reference's cells x candidates x features tensor for the small query alone would be
    # 300 x 16 x 2000 x 4 bytes = 37 MiB
    assert peaks[300] < budget and peaks[3000] < budget, peaks
    assert chunk < 300  # the budget, not the query, sets the chunk


def test_new_covariate_class_gets_its_own_component_and_leaves_the_model_untouched(mapped_atlas, tmp_path):
    model = DGD.load(mapped_atlas.model_dir)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    mapped = model.map(mapped_atlas.heldout, new_covariate_classes=True, progress=False)
    after = model.module.state_dict()
    for name, old in before.items():
        new = after[name]
        if name.startswith("covariate_gmms.batch."):
            assert new.shape[0] == old.shape[0] + 1
            new = new[: old.shape[0]]
        assert torch.equal(new, old), f"{name} changed"
    gmm = model.module.covariate_gmms["batch"]
    distances = torch.cdist(gmm.means[3:].detach(), gmm.means[:3].detach())
    spacing = torch.pdist(gmm.means[:3].detach()).min()
    assert distances.min() > 0.1 * spacing  # a component of its own, not a copy of a known class
    assert (mapped.obs["dgd_batch"].astype(str) == "batch_3").mean() >= 0.9
    model.save(tmp_path / "extended")
    again = DGD.load(tmp_path / "extended")
    assert again.vocab.covariates["batch"] == ["batch_0", "batch_1", "batch_2", "batch_3"]
    assert again.model_config.covariates == {"batch": 4}
    # the saved model now maps the class as known
    known = again.map(mapped_atlas.heldout[:50].copy(), progress=False)
    assert (known.obs["dgd_batch"].astype(str) == "batch_3").all()


def test_several_new_classes_at_once(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    query = mapped_atlas.heldout.copy()
    query.obs["batch"] = np.where(np.arange(query.n_obs) % 2 == 0, "site_a", "site_b")
    model.map(query, new_covariate_classes=True, epochs=2, progress=False)
    assert model.vocab.covariates["batch"][-2:] == ["site_a", "site_b"]
    assert model.module.covariate_gmms["batch"].n_components == 5


def test_mapped_cells_can_be_added_to_the_atlas(mapped_atlas, tmp_path):
    model = DGD.load(mapped_atlas.model_dir)
    n_before = model.cells.n_obs
    model.map(mapped_atlas.heldout, new_covariate_classes=True, add_to_atlas=True, epochs=2, progress=False)
    model.save(tmp_path / "grown")
    cells = DGD.load(tmp_path / "grown").embed()
    assert cells.n_obs == n_before + mapped_atlas.heldout.n_obs
    added = cells.obs["dgd_split"] == "mapped"
    assert added.sum() == mapped_atlas.heldout.n_obs
    assert set(cells.obs.loc[added, "batch"].astype(str)) == {"batch_3"}
    with pytest.raises(Exception, match="share names"):
        model.map(mapped_atlas.heldout, add_to_atlas=True, epochs=1, progress=False)


def test_two_step_search_ends_no_worse_than_its_first_candidate(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    query = mapped_atlas.heldout[:200].copy()
    one = model.map(query, epochs=5, progress=False)
    two = model.map(query, epochs=5, two_step=3, progress=False)
    assert two.obs["dgd_nll_per_feature"].mean() <= one.obs["dgd_nll_per_feature"].mean() * 1.01


def test_two_step_running_best_equals_the_argmin_over_every_candidates_end(mapped_atlas, monkeypatch):
    import atlasdgd.infer.mapping as mapping
    from atlasdgd.optim.row_adam import RepresentationTable

    model = DGD.load(mapped_atlas.model_dir)
    aligned = model.align(mapped_atlas.heldout[:200].copy())
    options = mapping.MappingOptions(epochs=1, two_step=3, two_step_epochs=2)
    running = mapping.map_cells(model.module, aligned, options)

    def stacked(module, starts, cells, opt, progress):  # every end kept, then argmin
        ends, losses = [], []
        for j in range(starts.shape[1]):
            table = RepresentationTable(starts[:, j], opt.lr, opt.betas)
            mapping.fit_representations(module, cells, table, opt.two_step_epochs)
            ends.append(table.values)
            losses.append(torch.from_numpy(mapping.cell_losses(module, cells, table.values)[0]))
        choice = torch.stack(losses, 1).argmin(1)
        return torch.stack(ends, 1)[torch.arange(starts.shape[0]), choice]

    monkeypatch.setattr(mapping, "_two_step", stacked)
    reference = mapping.map_cells(model.module, aligned, options)
    np.testing.assert_array_equal(running.values, reference.values)


def test_mixed_query_with_some_cells_missing_a_modality(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    q = mapped_atlas.heldout
    rna, atac = q["rna"].copy(), q["atac"][: q.n_obs // 2].copy()  # half the cells lack ATAC
    mixed = mudata.MuData({"rna": rna, "atac": atac})
    aligned = model.align(mixed)
    assert aligned.observed["atac"].sum() == q.n_obs // 2 and aligned.observed["rna"].all()
    mapped = model.map(mixed, epochs=5, progress=False)
    assert (mapped.obs["dgd_label"].astype(str) == q.obs["cell_type"].astype(str).to_numpy()).mean() >= 0.9


def test_mapping_rows_in_any_order_returns_them_in_that_order(mapped_atlas):
    from atlasdgd.infer.mapping import MappingOptions, map_cells

    model = DGD.load(mapped_atlas.model_dir)
    aligned = model.align(mapped_atlas.heldout[:40].copy())
    options = MappingOptions(epochs=2)
    rows = np.array([30, 3, 17, 8, 25])
    shuffled = map_cells(model.module, aligned, options, rows=rows)
    ordered = map_cells(model.module, aligned, options, rows=np.sort(rows))
    back = np.searchsorted(np.sort(rows), rows)
    np.testing.assert_array_equal(shuffled.values, ordered.values[back])
    np.testing.assert_array_equal(shuffled.loss, ordered.loss[back])


def test_mapping_batch_size_changes_speed_not_the_result(mapped_atlas, monkeypatch):
    """Each cell's representation is fitted on its own under the frozen model: 16 cells per step and
    the budget-sized default (all 300 cells in one step) end at the same representations, and so do
    16-cell steps in a shuffled order (the fits read in order)."""
    from atlasdgd.infer.mapping import MAX_FIT_BATCH, SHARED_BATCH_SIZE, MappingOptions, map_cells

    model = DGD.load(mapped_atlas.model_dir)
    aligned = model.align(mapped_atlas.heldout[:300].copy())
    sized = MappingOptions(epochs=3)
    assert sized.fit_batch_size(model.module) >= 300
    small = map_cells(model.module, aligned, MappingOptions(epochs=3, batch_size=16))
    large = map_cells(model.module, aligned, sized)
    np.testing.assert_allclose(large.values, small.values, rtol=0, atol=1e-5)  # float rounding only
    np.testing.assert_allclose(large.loss, small.loss, rtol=1e-5)
    in_order = type(aligned).loader
    monkeypatch.setattr(type(aligned), "loader", lambda self, rows, batch_size, **kw:
                        in_order(self, rows, batch_size, **{**kw, "shuffle": True, "seed": 3}))
    shuffled = map_cells(model.module, aligned, MappingOptions(epochs=3, batch_size=16))
    np.testing.assert_allclose(shuffled.values, small.values, rtol=0, atol=1e-5)
    # the default size: half the cells the budget allows, within [128, 1024]
    for budget in (2**16, 2**26, 2**34):
        want = int(min(MAX_FIT_BATCH, max(SHARED_BATCH_SIZE, chunk_cells(model.module, budget) // 2)))
        assert MappingOptions(memory_budget=budget).fit_batch_size(model.module) == want
    assert MappingOptions(memory_budget=2**16).fit_batch_size(model.module) == SHARED_BATCH_SIZE
    assert MappingOptions(memory_budget=2**34).fit_batch_size(model.module) == MAX_FIT_BATCH
    assert MappingOptions(batch_size=7, memory_budget=2**34).fit_batch_size(model.module) == 7
    with pytest.raises(ValueError, match="batch_size"):
        MappingOptions(batch_size=0)


def test_candidate_search_over_given_basal_positions_equals_the_default_over_the_means():
    cfg = ModelConfig(modalities={"rna": 25}, latent_dim=3, n_components=4, covariates={"batch": 2})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(3))
    rng = np.random.default_rng(3)
    a = ad.AnnData(X=sparse.csr_matrix(rng.poisson(2.0, (30, 25)).astype(np.float32)),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(25)]))
    a.obs_names = [f"c{i}" for i in range(30)]
    q = align_query(a, {"rna": list(a.var_names)}, {"batch": ["0", "1"]})
    default = candidate_search(module, q.loader(np.arange(30), 8, shuffle=False), 30, keep=2)
    given = candidate_search(module, q.loader(np.arange(30), 8, shuffle=False), 30, keep=2,
                             basal_candidates=module.basal.means.detach().clone())
    torch.testing.assert_close(default[0], given[0], rtol=0, atol=0)
    torch.testing.assert_close(default[1], given[1], rtol=0, atol=0)
    # a far-off extra candidate is never chosen
    extra = torch.cat([module.basal.means.detach(), torch.full((1, 3), 50.0)])
    starts, _ = candidate_search(module, q.loader(np.arange(30), 8, shuffle=False), 30, basal_candidates=extra)
    assert not (starts[:, 0, :3] == 50.0).any()
