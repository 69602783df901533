"""The scvi-tools shaped calls on DGD: latent representation, normalised expression, map(inplace=True),
the summary repr and refused keyword arguments, on AnnData and MuData."""

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest

from atlasdgd import DGD, simulate
from atlasdgd.errors import ArgumentError
from atlasdgd.simulate import SimulationConfig

EPOCHS = dict(max_epochs=4, min_epochs=4, heldout_epochs=2, progress=False)


def _split(data, n_query: int = 120):
    """Reference and query of one simulation (the query keeps its batch labels)."""
    return data[:-n_query].copy(), data[-n_query:].copy()


@pytest.fixture(scope="module", params=["anndata", "mudata"])
def trained(request):
    cfg = SimulationConfig(n_cells=700, n_types=3, n_batches=2, n_genes=60, seed=11,
                           n_peaks=300 if request.param == "mudata" else 0)
    reference, query = _split(simulate(cfg))
    model = DGD(reference, label_key="cell_type", covariate_keys=["batch"], latent_dim=4, seed=0)
    model.train(**EPOCHS)
    return model, reference, query


def test_latent_representation_of_training_cells_and_of_a_query(trained):
    model, reference, query = trained
    z = model.get_latent_representation()
    np.testing.assert_array_equal(z, model.embed().obsm["X_dgd"])
    assert z.shape == (reference.n_obs, 4)
    full = model.get_latent_representation(covariates=True)
    np.testing.assert_array_equal(full, model.representation)
    mapped = model.map(query, progress=False)
    zq = model.get_latent_representation(query, progress=False)
    np.testing.assert_allclose(zq, mapped.obsm["X_dgd"], rtol=0, atol=1e-6)  # mapping is seeded
    assert zq.shape == (query.n_obs, 4)


def test_normalized_expression_is_the_decoded_fractions(trained):
    model, reference, query = trained
    expr = model.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and list(expr.columns) == model.vocab.features["rna"]
    assert list(expr.index) == list(model.embed().obs_names)
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1.0, rtol=1e-4)
    # independent: exp of the model's log fractions of the full representations
    want = np.exp(model.log_fractions(model.representation)["rna"])
    np.testing.assert_allclose(expr.to_numpy(), want, rtol=1e-5, atol=1e-9)
    genes = model.vocab.features["rna"][5:8]
    scaled = model.get_normalized_expression(query, library_size=1e4, gene_list=genes, progress=False)
    assert scaled.shape == (query.n_obs, 3) and list(scaled.columns) == genes
    all_q = model.get_normalized_expression(query, library_size=1e4, return_numpy=True, progress=False)
    np.testing.assert_allclose(all_q.sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(scaled.to_numpy(), all_q[:, 5:8], rtol=1e-5)
    if "atac" in model.model_config.modalities:
        atac = model.get_normalized_expression(modality="atac", return_numpy=True)
        np.testing.assert_allclose(atac.sum(1), 1.0, rtol=1e-4)
    with pytest.raises(Exception, match="not rna features"):
        model.get_normalized_expression(gene_list=["no_such_gene"])
    with pytest.raises(Exception, match="unknown modality"):
        model.get_normalized_expression(modality="protein")


def test_map_in_place_writes_exactly_the_documented_keys(trained):
    model, _, query = trained
    returned = model.map(query, progress=False)
    target = query.copy()
    before_obs, before_obsm = set(target.obs.columns), set(target.obsm.keys())
    assert model.map(target, inplace=True, progress=False) is None
    new_obs = set(target.obs.columns) - before_obs
    new_obsm = set(target.obsm.keys()) - before_obsm
    assert new_obs == {"dgd_cluster", "dgd_label", "dgd_label_confidence"}
    assert new_obsm == {"X_dgd", "X_dgd_batch", "dgd_label_probabilities"}
    for key in before_obs:  # nothing else changed
        pd.testing.assert_series_equal(target.obs[key], query.obs[key])
    if isinstance(target, mudata.MuData):
        for m in query.mod:
            np.testing.assert_array_equal(target[m].X.toarray(), query[m].X.toarray())
    else:
        np.testing.assert_array_equal(target.X.toarray(), query.X.toarray())
    np.testing.assert_allclose(target.obsm["X_dgd"], returned.obsm["X_dgd"], atol=1e-6)
    assert list(target.obs["dgd_label"]) == list(returned.obs["dgd_label"])
    probs = target.obsm["dgd_label_probabilities"]
    # one column per label, and "unknown" (the mass for cells unlike any labelled training cell)
    assert list(probs.columns) == [*model.vocab.labels, "unknown"] and list(probs.index) == list(target.obs_names)
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-5)


def test_repr_summarises_the_model(trained):
    model, reference, _ = trained
    text = repr(model)
    for part in ("rna (60 features)", f"{reference.n_obs:,} cells", "4 epochs trained", "3 components",
                 "3 labels from obs['cell_type']", "batch (2 classes)", "device: cpu"):
        assert part in text, (part, text)
    if "atac" in model.model_config.modalities:
        assert "atac (300 features)" in text


def test_unknown_keyword_arguments_are_refused_with_the_valid_ones():
    data = simulate(SimulationConfig(n_cells=200, n_types=2, n_batches=1, n_genes=30, seed=1))
    with pytest.raises(ArgumentError, match=r"'n_latent'.*valid are: .*latent_dim") as err:
        DGD(data, n_latent=10)
    assert isinstance(err.value, TypeError)
    model = DGD(data, latent_dim=3)
    with pytest.raises(ArgumentError, match=r"'max_epoch' \(did you mean 'max_epochs'\?\)"):
        model.train(max_epoch=3)
    assert model.cells is None  # refused before any work
