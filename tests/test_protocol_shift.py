"""A batch from another protocol (strong gene-specific scaling) and a mixture with many unequal
components: the mapping and mixture behaviour issue 10 asks for, on simulated data with known truth."""

import numpy as np
import pytest

import atlasdgd
from atlasdgd.evaluate.metrics import confidence_report


@pytest.fixture(scope="module")
def shifted():
    # the query batch's log fold changes per gene are 4x those between the training batches (sd 2.0)
    data = atlasdgd.simulate(n_cells=2400, n_types=5, n_batches=4, n_genes=400, batch_effect=0.5,
                             batch_scale=(1, 1, 1, 4), seed=5)
    query = (data.obs["batch"] == "batch_3").to_numpy()
    model = atlasdgd.DGD(data[~query].copy(), label_key="cell_type", covariate_keys=["batch"], seed=0)
    model.train(max_epochs=30, min_epochs=30, progress=False)
    return model, data[query].copy()


@pytest.mark.parametrize("new_classes", [False, True])
def test_a_batch_from_another_protocol_keeps_its_labels(shifted, new_classes):
    model, query = shifted
    mapped = model.map(query, new_covariate_classes=new_classes, progress=False)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    labels = mapped.obs["dgd_label"].astype(str).to_numpy()
    report = confidence_report(labels, truth, mapped.obs["dgd_label_confidence"].to_numpy())
    assert report["accuracy"] >= 0.95, report
    assert report["ece"] <= 0.05, report
    if report["mean_confidence_wrong"] is not None:
        assert report["mean_confidence_wrong"] < report["mean_confidence_right"], report


def test_many_unequal_clusters_keep_every_component_without_labels():
    data = atlasdgd.simulate(n_cells=3000, n_types=20, n_batches=2, n_genes=300, seed=1)
    sizes = data.obs["cell_type"].value_counts()
    assert sizes.max() > 5 * sizes.min()  # unequal on purpose (Dirichlet type sizes)
    model = atlasdgd.DGD(data, covariate_keys=["batch"], n_components=20, seed=0)
    model.train(max_epochs=30, min_epochs=30, progress=False)
    cells = model.embed()
    held = cells.obs["dgd_cluster"].value_counts()
    assert len(held) == 20, held
    # no component swallows others: the largest holds no more than 1.5x the largest type
    assert held.max() <= 1.5 * sizes.max(), (held.max(), sizes.max())
