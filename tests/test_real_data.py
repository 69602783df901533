"""Smoke tests on the shared real data sets (skipped, saying why, when ../shared/data is absent).

Quality on Kang PBMC and SNARE-seq is measured by benchmarks/quality_real_data.py (minutes per run).
"""

import numpy as np

from atlasdgd import DGD
from atlasdgd.data.adapters import read_input

from conftest import shared_data


def test_real_multiome_mudata_trains_and_predicts_atac_from_rna():
    mdata = read_input(shared_data("pbmc_multiome_muon_1000cells.h5mu"))
    model = DGD(mdata, latent_dim=8, n_components=4, seed=0)
    assert model.model_config.modalities == {"atac": 174, "rna": 45}
    h = model.train(max_epochs=15, min_epochs=15, heldout_epochs=2, progress=False)
    assert h["val_recon"].iloc[-1] < h["val_recon"].iloc[0]
    assert np.isfinite(model.representation).all()
    assert h["val_recon_atac"].notna().all() and h["val_recon_rna"].notna().all()
    # RNA-only test cells: their predicted ATAC beats the training cells' mean accessibility profile
    split = model.data.obs["dgd_split"].to_numpy()
    test = mdata[split == "test"].copy()
    rna = test["rna"].copy()
    pred = model.predict(rna, epochs=10, progress=False)["atac"]
    truth = test["atac"].X.toarray()
    profile = np.asarray(mdata["atac"][split == "train"].X.sum(0)).ravel()
    baseline = np.tile(profile / profile.sum(), (len(truth), 1))

    def corr(a, b):
        keep = b.sum(1) > 0  # cells with no ATAC counts have no profile to compare with
        a, b = a[keep] - a[keep].mean(1, keepdims=True), b[keep] - b[keep].mean(1, keepdims=True)
        return np.mean((a * b).sum(1) / np.sqrt((a**2).sum(1) * (b**2).sum(1)))

    assert corr(np.asarray(pred.X), truth) > corr(baseline, truth)


def test_real_kang_input_is_accepted_with_donor_covariate():
    adata = read_input(shared_data("kang2018_ctrl_5donors_muscat.h5ad"))
    model = DGD(adata, label_key="cell_type", covariate_keys=["donor"])
    assert model.model_config.n_components == 4
    assert model.model_config.covariates == {"donor": 5}
    split = model.data.obs["dgd_split"].value_counts(normalize=True)
    assert abs(split["train"] - 0.8) < 0.01
