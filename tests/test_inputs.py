"""Every rejected input raises InputError with a message that names the problem and the fix."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from atlasdgd import DGD
from atlasdgd.data.adapters import prepare
from atlasdgd.errors import InputError


def _adata(n=20, f=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (n, f)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame({"batch": ["a", "b"] * (n // 2), "cell_type": ["t1"] * (n // 2) + ["t2"] * (n // 2)},
                       index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=sparse.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(f)]))


def test_valid_input_is_accepted_with_integer_floats():
    data = prepare(_adata(), label_key="cell_type", covariate_keys=["batch"])
    assert data.counts["rna"].dtype == np.float32
    assert set(data.obs["dgd_split"]) <= {"train", "validation", "test"}


@pytest.mark.parametrize(
    "bad, words",
    [(np.nan, ["non-finite", "raw count"]), (np.inf, ["non-finite"]), (-1.0, ["negative", "raw count"]),
     (0.5, ["non-integer", "0.5", "raw count"])],
)
def test_bad_count_values(bad, words):
    a = _adata()
    x = a.X.toarray()
    x[3, 2] = bad
    a.X = sparse.csr_matrix(x)
    with pytest.raises(InputError) as e:
        prepare(a)
    for w in words:
        assert w in str(e.value)
    assert "'rna'" in str(e.value)


def test_dense_input_is_checked_too():
    a = _adata()
    a.X = a.X.toarray() * 0.3
    with pytest.raises(InputError, match="non-integer"):
        prepare(a)


def test_cells_with_no_counts_in_any_modality():
    a = _adata()
    x = a.X.toarray()
    x[[4, 7]] = 0
    a.X = sparse.csr_matrix(x)
    with pytest.raises(InputError) as e:
        prepare(a)
    assert "2 cells have zero counts" in str(e.value) and "'c4'" in str(e.value) and "filter_cells" in str(e.value)


def test_a_cell_empty_in_one_modality_only_is_fine():
    a, b = _adata(), _adata(seed=1)
    x = b.X.toarray()
    x[4] = 0
    b.X = sparse.csr_matrix(x)
    data = prepare(md.MuData({"rna": a, "atac": b}))
    assert data.library("atac")[4] == 0


def test_duplicate_cell_names():
    a = _adata()
    a.obs_names = ["c0"] * 2 + list(a.obs_names[2:])
    with pytest.raises(InputError, match=r"duplicate cell names.*obs_names_make_unique"):
        prepare(a)


def test_missing_covariate_values():
    a = _adata()
    a.obs.loc["c3", "batch"] = None
    with pytest.raises(InputError) as e:
        prepare(a, covariate_keys=["batch"])
    assert "covariate 'batch' is missing for 1 cells" in str(e.value) and "'c3'" in str(e.value) and "fill" in str(e.value)


def test_unknown_obs_keys_list_the_columns():
    with pytest.raises(InputError, match=r"covariate key 'donor' is not a column of obs.*'batch'"):
        prepare(_adata(), covariate_keys=["donor"])
    with pytest.raises(InputError, match=r"label key 'celltype'"):
        prepare(_adata(), label_key="celltype")


def test_unknown_modality_names():
    mdata = md.MuData({"rna": _adata(), "atac": _adata(seed=1)})
    with pytest.raises(InputError, match=r"unknown modalities \['protein'\].*\['rna', 'atac'\]"):
        prepare(mdata, modalities=["rna", "protein"])


def test_unknown_layer_and_modality_column():
    with pytest.raises(InputError, match="layer 'counts' is not in modality 'rna'"):
        prepare(_adata(), layer="counts")
    with pytest.raises(InputError, match="modality key 'feature_types' is not a column of var"):
        prepare(_adata(), modality_key="feature_types")


@pytest.mark.parametrize("shape", [(0, 10), (20, 0)])
def test_empty_inputs(shape):
    a = _adata()[: shape[0], : shape[1]].copy()
    with pytest.raises(InputError, match="no cells|empty"):
        prepare(a)


def test_not_anndata():
    with pytest.raises(InputError, match="expected AnnData or MuData"):
        prepare(np.zeros((3, 3)))


def test_bad_split_column():
    a = _adata()
    a.obs["split"] = ["train"] * 19 + ["holdout"]
    with pytest.raises(InputError, match=r"not train/validation/test.*'holdout'"):
        prepare(a, split_key="split")


def test_var_column_names_modalities():
    a = _adata(f=10)
    a.var["feature_types"] = ["Gene Expression"] * 6 + ["Peaks"] * 4
    data = prepare(a, modality_key="feature_types")
    assert data.modalities == ["rna", "atac"]
    assert data.counts["atac"].shape == (20, 4)
    np.testing.assert_array_equal(data.counts["atac"].toarray(), a.X.toarray()[:, 6:])


def test_mudata_with_cells_missing_from_a_modality_marks_them_unobserved():
    rna, atac = _adata(), _adata(seed=1)[5:].copy()
    data = prepare(md.MuData({"rna": rna, "atac": atac}))
    assert data.n_cells == 20
    assert data.observed["atac"].tolist() == [False] * 5 + [True] * 15
    np.testing.assert_array_equal(data.counts["atac"][5:].toarray(), atac.X.toarray())
    assert data.counts["atac"][:5].nnz == 0


def test_model_rejects_bad_input_before_any_work(tmp_path):
    a = _adata()
    a.X = a.X * -1
    with pytest.raises(InputError):
        DGD(a, covariate_keys=["batch"])
