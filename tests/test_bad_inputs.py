"""Every bad input of the README's table is refused before any work: exit code 2, a message that
names the problem and the fix, nothing written."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from atlasdgd.cli import main


def _adata(n=60, f=12, seed=0, **obs):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (n, f)).astype(np.float32)
    x[:, 0] += 1
    frame = pd.DataFrame({"batch": ["a", "b"] * (n // 2), "cell_type": ["t1", "t2", "t3"] * (n // 3)},
                         index=[f"c{i}" for i in range(n)])
    for k, v in obs.items():
        frame[k] = v
    return ad.AnnData(X=sparse.csr_matrix(x), obs=frame, var=pd.DataFrame(index=[f"g{j}" for j in range(f)]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    good = _adata()
    good.layers["raw"] = good.X.copy()
    good.write_h5ad(d / "good.h5ad")
    (d / "text.h5ad").write_text("this is not an HDF5 file\n")
    (d / "plain_dir").mkdir()
    dup = _adata()
    dup.var_names = ["g0", "g0"] + [f"g{j}" for j in range(2, 12)]
    dup.write_h5ad(d / "dup.h5ad")
    empty = _adata()
    x = empty.X.toarray()
    x[[3, 5]] = 0
    empty.X = sparse.csr_matrix(x)
    empty.write_h5ad(d / "empty_cells.h5ad")
    other = _adata()
    other.var_names = [f"other{j}" for j in range(12)]
    other.write_h5ad(d / "other_features.h5ad")
    model = d / "model"
    assert main(["train", str(d / "good.h5ad"), "--out", str(model), "--label-key", "cell_type", "--covariate-key",
                 "batch", "--epochs", "2", "--min-epochs", "1", "--latent-dim", "3", "--components", "3", "--quiet"]) == 0
    return d


# (command line with {d} for the folder, words the message must contain)
CASES = {
    "not an h5ad file": (["train", "{d}/text.h5ad", "--out", "{d}/out"], ["not", "h5ad"]),
    "missing file": (["train", "{d}/nothing.h5ad", "--out", "{d}/out"], ["does not exist"]),
    "directory that is no store": (["train", "{d}/plain_dir", "--out", "{d}/out"], ["plain_dir"]),
    "unknown URI scheme": (["train", "nosuch://bucket/a.zarr", "--out", "{d}/out"], ["nosuch"]),
    "missing label key": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--label-key", "celltype"], ["celltype", "cell_type"]),
    "missing covariate key": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--covariate-key", "donor"], ["donor", "batch"]),
    "missing layer": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--layer", "counts"], ["counts", "raw"]),
    "duplicate feature names": (["train", "{d}/dup.h5ad", "--out", "{d}/out"], ["duplicate", "var_names_make_unique"]),
    "cells with no counts": (["train", "{d}/empty_cells.h5ad", "--out", "{d}/out"], ["zero counts", "c3"]),
    "zero epochs": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--epochs", "0"], ["--epochs", ">= 1"]),
    "negative batch size": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--batch-size", "-4"], ["batch", ">= 1"]),
    "unknown device": (["train", "{d}/good.h5ad", "--out", "{d}/out", "--device", "tpu"], ["tpu", "cuda"]),
    "query sharing no features": (["map", "{d}/model", "{d}/other_features.h5ad", "--out", "{d}/out.h5ad"],
                                  ["feature"]),
    "map into a missing model": (["map", "{d}/no_model", "{d}/good.h5ad", "--out", "{d}/out.h5ad"], ["model"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message_and_writes_nothing(files, case, capsys):
    args, words = CASES[case]
    before = sorted(p.name for p in files.iterdir())
    code = main([a.format(d=files) for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in err.lower(), (case, err)
    assert sorted(p.name for p in files.iterdir()) == before


def test_a_backed_anndata_is_refused_with_the_fix(files):
    from atlasdgd import DGD
    from atlasdgd.errors import InputError

    backed = ad.read_h5ad(files / "good.h5ad", backed="r")
    with pytest.raises(InputError, match="backed"):
        DGD(backed, label_key="cell_type")
