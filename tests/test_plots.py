"""Every `atlasdgd plot` kind writes a non-empty PNG of the size its figure asks for."""

import matplotlib.image as mpimg
import pytest

from atlasdgd.cli import main
from atlasdgd.plotting import DPI, FIGSIZE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    assert main(["simulate", "--out", str(d / "a.h5mu"), "--cells", "400", "--genes", "40", "--peaks", "120",
                 "--types", "3", "--batches", "2", "--quiet"]) == 0
    assert main(["train", str(d / "a.h5mu"), "--out", str(d / "m"), "--label-key", "cell_type", "--covariate-key",
                 "batch", "--epochs", "3", "--min-epochs", "1", "--latent-dim", "3", "--components", "3", "--quiet"]) == 0
    return d


@pytest.mark.parametrize("kind, panels", [("umap", 3), ("clusters", 1), ("covariates", 1), ("training", 1)])
def test_model_plots_render_at_their_size(trained, kind, panels, tmp_path):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(trained / "m"), "--kind", kind, "--out", str(out), "--quiet"]) == 0
    image = mpimg.imread(out)
    w, h = FIGSIZE[kind]
    assert image.shape[:2] == (round(h * DPI), round(w * DPI * panels))
    assert image[..., :3].std() > 0.01  # something was drawn


def test_gene_to_peak_tracks_from_perturb_output(trained, tmp_path):
    table = tmp_path / "perturb.csv"
    assert main(["perturb", str(trained / "m"), str(trained / "a.h5mu"), "--gene", "gene_00000,gene_00001",
                 "--epochs", "1", "--two-step", "0", "--out", str(table), "--quiet"]) == 0
    out = tmp_path / "tracks.png"
    assert main(["plot", str(trained / "m"), "--kind", "gene-to-peak", "--table", str(table), "--out", str(out),
                 "--quiet"]) == 0
    image = mpimg.imread(out)
    w, h = FIGSIZE["gene-to-peak"]
    assert image.shape[:2] == (round(h * DPI * 2), round(w * DPI))
    # refusals: no table, unknown colour column; nothing written
    assert main(["plot", str(trained / "m"), "--kind", "gene-to-peak", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["plot", str(trained / "m"), "--kind", "umap", "--color", "nope", "--out", str(tmp_path / "y.png")]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
