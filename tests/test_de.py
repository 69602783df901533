"""Differential expression from the model: the simulator's true fold changes are recovered, better
than a t-test on log-normalised counts when the batch confounds the groups; the CLI writes the table."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from atlasdgd import DGD, simulate
from atlasdgd.cli import main
from atlasdgd.simulate import SimulationConfig, _truth

CFG = SimulationConfig(n_cells=3000, n_types=4, n_batches=2, n_genes=150, batch_effect=1.0, seed=21)


def _true_lfc(data, cfg, a: str, b: str) -> np.ndarray:
    """log2 ratio of the two types' mean true fractions, without batch effects (the simulator's truth)."""
    truth = _truth(cfg)
    h = np.tanh(data.obsm["true_latent"] @ truth.a + truth.b)
    logits = truth.base["rna"] + h @ truth.loadings["rna"]
    frac = np.exp(logits - logits.max(1, keepdims=True))
    frac /= frac.sum(1, keepdims=True)
    types = data.obs["cell_type"].astype(str).to_numpy()
    return np.log2(frac[types == a].mean(0)) - np.log2(frac[types == b].mean(0))


@pytest.fixture(scope="module")
def confounded():
    data = simulate(CFG)
    types, batches = data.obs["cell_type"].astype(str), data.obs["batch"].astype(str)
    # type_0 almost only in batch_0 and type_1 almost only in batch_1: the batch effect confounds the comparison
    rng = np.random.default_rng(0)
    drop = (((types == "type_0") & (batches == "batch_1")) | ((types == "type_1") & (batches == "batch_0"))) \
        & (rng.random(len(types)) < 0.95)
    data = data[~drop.to_numpy()].copy()
    model = DGD(data, label_key="cell_type", covariate_keys=["batch"], latent_dim=8, seed=0)
    model.train(max_epochs=60, min_epochs=60, heldout_epochs=5, progress=False)
    return data, model


def test_de_recovers_the_simulated_changes_and_beats_a_t_test_under_confounding(confounded):
    data, model = confounded
    truth = _true_lfc(data, CFG, "type_0", "type_1")
    # changed (|log2 FC| > 2) against unchanged (< 0.5) genes; those in between are left out
    clear = (np.abs(truth) > 2) | (np.abs(truth) < 0.5)
    is_de = np.abs(truth[clear]) > 2
    assert 10 < is_de.sum() < clear.sum() - 10
    table = model.differential_expression("cell_type", "type_0", "type_1", n_samples=2000)
    assert set(table["group1"]) == {"type_0"} and set(table["group2"]) == {"type_1"}
    table = table.set_index("feature").loc[data.var_names]
    auroc_dgd = roc_auc_score(is_de, -table["rank"].to_numpy()[clear])
    # estimated fold changes follow the true ones
    assert stats.spearmanr(table["log2fc"], truth).statistic > 0.9
    x = data.X.toarray()
    logn = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    types = data.obs["cell_type"].astype(str).to_numpy()
    t = stats.ttest_ind(logn[types == "type_0"], logn[types == "type_1"]).statistic
    auroc_t = roc_auc_score(is_de, np.abs(np.nan_to_num(t))[clear])
    assert auroc_dgd > 0.9 and auroc_dgd > auroc_t + 0.05, (auroc_dgd, auroc_t)
    assert ((table["proba_de"] >= 0) & (table["proba_de"] <= 1)).all()
    np.testing.assert_allclose(table["scale1"].sum(), 1.0, rtol=1e-3)  # mean fractions of a group sum to 1


def test_one_against_the_rest_for_every_group_and_refusals(confounded):
    _, model = confounded
    table = model.differential_expression("cell_type", n_samples=300)
    assert sorted(set(table["group1"])) == [f"type_{i}" for i in range(4)] and set(table["group2"]) == {"rest"}
    assert (table.groupby("group1")["rank"].max() == 150).all()
    with pytest.raises(Exception, match="not a value of 'cell_type'"):
        model.differential_expression("cell_type", "type_9")
    with pytest.raises(Exception, match="not a column"):
        model.differential_expression("no_such_column")
    with pytest.raises(Exception, match="share cells"):
        model.differential_expression("cell_type", ["type_0", "type_1"], "type_1")


def test_de_command_writes_a_table(confounded, tmp_path, capsys):
    _, model = confounded
    model.save(tmp_path / "model")
    out = tmp_path / "de.csv"
    assert main(["de", str(tmp_path / "model"), "--groupby", "cell_type", "--group1", "type_2",
                 "--n-samples", "300", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[:6]) == ["group1", "group2", "modality", "feature", "rank", "log2fc"]
    assert len(table) == 150 and set(table["group1"]) == {"type_2"}
    assert main(["de", str(tmp_path / "model"), "--groupby", "cell_type", "--out", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "x.txt").exists()
