"""Missing-modality prediction, library-size model, gene-to-peak perturbation, sampling, evaluation metrics."""

import numpy as np
import pytest
import torch
from scipy import sparse, stats
from sklearn.metrics import average_precision_score

from atlasdgd import DGD
from atlasdgd.evaluate.reconstruction import reconstruction_metrics
from atlasdgd.evaluate.report import evaluate
from atlasdgd.infer.library import LibraryModel
from atlasdgd.infer.perturb import feature_positions
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule


def _rows_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a**2).sum(1) * (b**2).sum(1))


def test_library_model_recovers_a_log_linear_relation_and_falls_back_to_the_median():
    rng = np.random.default_rng(0)
    log_rna = rng.normal(8, 0.5, 4000)
    log_atac = 1.0 + 0.7 * log_rna + rng.normal(0, 0.05, 4000)
    observed = {"rna": np.ones(4000, bool), "atac": np.ones(4000, bool)}
    lm = LibraryModel.fit({"rna": np.exp(log_rna), "atac": np.exp(log_atac)}, observed)
    pair = lm.pairs["atac"]["rna"]
    assert pair["a"] == pytest.approx(1.0, abs=0.1) and pair["b"] == pytest.approx(0.7, abs=0.01) and pair["r2"] > 0.9
    lib, source = lm.predict("atac", {"rna": np.array([np.exp(8.0), 0.0])}, {"rna": np.array([True, False]), "atac": np.array([False, False])})
    assert lib[0] == pytest.approx(np.exp(1.0 + 0.7 * 8.0), rel=0.05)
    assert lib[1] == pytest.approx(np.exp(np.median(log_atac)), rel=1e-5)
    assert list(source) == ["from rna", "training median"]
    again = LibraryModel.from_dict(lm.to_dict())
    five = {m: o[:5] for m, o in observed.items()}
    np.testing.assert_array_equal(again.predict("atac", {"rna": np.exp(log_rna[:5])}, five)[0],
                                  lm.predict("atac", {"rna": np.exp(log_rna[:5])}, five)[0])


def test_missing_modality_predictions_beat_a_per_feature_mean(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    q = mapped_atlas.heldout
    rna_only = q["rna"].copy()
    rna_only.obs = q.obs.copy()
    pred = model.predict(rna_only, progress=False)
    assert set(pred) == {"rna", "atac"}
    atac = pred["atac"]
    assert (atac.obs["dgd_library_source"] == "from rna").all()
    truth = q["atac"].X.toarray()
    mean_profile = mapped_atlas.train["atac"].X.toarray().sum(0)
    mean_profile = mean_profile / mean_profile.sum()
    baseline = mean_profile[None, :] * atac.obs["dgd_library"].to_numpy()[:, None]
    dgd = atac.layers["dgd_mean"]
    np.testing.assert_allclose(dgd, atac.X * atac.obs["dgd_library"].to_numpy()[:, None], rtol=1e-5)
    corr_dgd, corr_base = _rows_corr(dgd, truth).mean(), _rows_corr(baseline, truth).mean()
    assert corr_dgd > corr_base + 0.02, (corr_dgd, corr_base)
    np.testing.assert_allclose(atac.var["dgd_dispersion"].to_numpy(), model.module.dispersion("atac").detach().numpy())
    # the simulator draws each modality's depth independently: the regression learns ~no slope and
    # predicts about the training median
    median = np.median(np.asarray(mapped_atlas.train["atac"].X.sum(1)).ravel())
    assert np.median(atac.obs["dgd_library"]) == pytest.approx(median, rel=0.1)


def test_perturbing_a_linked_gene_moves_its_peaks_most(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    data = mapped_atlas.train
    genes = data["rna"].var
    linked = genes.index[genes["linked_peaks"] > 0]
    # the most expressed linked gene: enough cells express it
    expression = np.asarray(data["rna"][:, linked].X.sum(0)).ravel()
    gene = linked[int(np.argmax(expression))]
    table = model.perturb(data[:600].copy(), [gene], steps=3, epochs=5, progress=False)
    peaks = table[table["modality"] == "atac"].set_index("feature")
    is_linked = (data["atac"].var["linked_gene"] == gene).reindex(peaks.index).to_numpy()
    size = peaks["mean_delta"].abs()
    assert size[is_linked].mean() > 3 * size[~is_linked].mean()
    # linked peaks sit within 50 kb of the gene's TSS, and the table says so
    assert peaks.loc[is_linked, "distance_to_tss"].abs().max() <= 50_500
    rna = table[table["modality"] == "rna"].set_index("feature")
    assert rna.loc[gene, "mean_delta"] < 0  # the knocked-down gene itself goes down


def test_perturb_groups_and_several_genes(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    data = mapped_atlas.train[:300].copy()
    table = model.perturb(data, ["gene_00000", "gene_00001"], group_by="cell_type", epochs=2, progress=False)
    assert set(table["gene"]) == {"gene_00000", "gene_00001"}
    counts = table.groupby(["gene", "group"])["n_cells"].first()
    x = data["rna"].X.tocsc()
    for gene in ("gene_00000", "gene_00001"):
        col = np.asarray(x[:, int(gene[-1])].todense()).ravel()
        expected = data.obs.loc[col > 0, "cell_type"].astype(str).value_counts()
        for group, n in expected.items():
            assert counts[(gene, group)] == n
    with pytest.raises(Exception, match="not one of the model"):
        model.perturb(data, ["nope"], epochs=1, progress=False)


def test_feature_positions_from_columns_or_names():
    import pandas as pd

    var = pd.DataFrame(index=["chr1:100-300", "chr2_1000_1200", "chrX:5-7"])
    pos = feature_positions(var)
    assert list(pos["chrom"]) == ["chr1", "chr2", "chrX"] and list(pos["position"]) == [200, 1100, 6]
    assert feature_positions(pd.DataFrame(index=["Gad1", "Sst"])) is None


def test_samples_come_from_the_chosen_component_with_nb_counts(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    label = model.vocab.component_labels[2]
    mods = model.sample(3000, component=label, library={"rna": 2000.0}, seed=1)
    rna = mods["rna"]
    assert (rna.obs["dgd_cluster"] == 2).mean() > 0.9
    # counts are NB draws around dgd_mean: their average matches the mean's average
    emp = np.asarray(rna.X.mean(0)).ravel()
    mean = rna.layers["dgd_mean"].mean(0)
    top = np.argsort(mean)[-50:]
    np.testing.assert_allclose(emp[top], mean[top], rtol=0.15)
    assert rna.X.sum(1).mean() == pytest.approx(2000, rel=0.05)
    with pytest.raises(Exception, match="no component carries label"):
        model.sample(5, component="not a type")


def test_reconstruction_metrics_match_direct_computation():
    cfg = ModelConfig(modalities={"atac": 40}, latent_dim=3, n_components=1)
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    x = sparse.csr_matrix(rng.poisson(0.3, (30, 40)).astype(np.float32))
    z = rng.normal(size=(30, 3)).astype(np.float32)
    got = reconstruction_metrics(module, {"atac": x}, z, auprc_modalities=("atac",), batch_size=7)["atac"]
    with torch.no_grad():
        y = torch.softmax(module.decoder(torch.from_numpy(z))["atac"], 1).numpy().astype(np.float64)
        r = module.dispersion("atac").numpy().astype(np.float64)
    xd = x.toarray()
    mu = y * xd.sum(1, keepdims=True)
    p = r / (r + mu)
    assert got["rmse"] == pytest.approx(np.sqrt(((xd - mu) ** 2).mean()), rel=1e-5)
    assert got["nb_nll_per_feature"] == pytest.approx(-stats.nbinom.logpmf(xd, r, p).mean(), rel=1e-4)
    assert got["auprc"] == pytest.approx(average_precision_score((xd > 0).ravel(), (1 - p**r).ravel()), rel=1e-4)


def test_evaluate_reports_clusters_mixing_and_heldout_reconstruction(mapped_atlas):
    model = DGD.load(mapped_atlas.model_dir)
    m = evaluate(model, mapped_atlas.data, "cell_type", "batch", predict_modalities=["atac"], epochs=5)
    assert m["cells_mapped"] == mapped_atlas.heldout.n_obs  # batch 3 was never seen
    assert m["cells_heldout"] > m["cells_mapped"]  # plus the model's test split
    assert m["ari"] > 0.8 and 0 <= m["batch_mixing"] <= 1
    assert set(m["heldout"]) == {"rna", "atac"} and "auprc" in m["heldout"]["atac"]
    pred = m["predicted"]["atac"]
    assert m["predicted"]["from"] == ["rna"]
    assert pred["auprc"] > pred["positive_rate"]  # better than a random score
    assert pred["nb_nll_per_feature"] >= m["heldout"]["atac"]["nb_nll_per_feature"] * 0.98
