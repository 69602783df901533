import anndata as ad
import mudata as md
import numpy as np
import pytest
from scipy import stats

import atlasdgd
from atlasdgd.simulate import CHUNK_CELLS, SimulationConfig, write_simulation


def test_same_seed_same_data_other_seed_other_data():
    a = atlasdgd.simulate(n_cells=300, n_genes=50, seed=1)
    b = atlasdgd.simulate(n_cells=300, n_genes=50, seed=1)
    c = atlasdgd.simulate(n_cells=300, n_genes=50, seed=2)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_counts_are_integer_and_libraries_log_normal():
    a = atlasdgd.simulate(n_cells=3000, n_genes=400, rna_library=2000, library_sd=0.4, seed=0)
    x = a.X
    assert np.array_equal(x.data, np.round(x.data)) and (x.data > 0).all()
    lib = np.log(np.asarray(x.sum(1)).ravel())
    assert np.median(lib) == pytest.approx(np.log(2000), abs=0.05)
    assert lib.std() == pytest.approx(0.4, abs=0.05)


def test_nb_dispersion_shows_in_the_counts():
    """Cells of one type and batch in one chunk: per-gene variance exceeds the Poisson mean."""
    cfg = SimulationConfig(n_cells=4000, n_types=1, n_batches=1, n_genes=50, library_sd=0.0, type_spread=0.0, signal=0.0)
    a = atlasdgd.simulate(cfg)
    x = a.X.toarray()
    mean, var = x.mean(0), x.var(0)
    # without latent signal and library noise, counts are NB(mu, r): var = mu + mu^2 / r
    from atlasdgd.simulate import _truth

    r = _truth(cfg).dispersion["rna"]
    expected = mean + mean**2 / r
    big = mean > 5
    np.testing.assert_allclose(var[big], expected[big], rtol=0.15)


def test_modalities_and_truth_columns():
    m = atlasdgd.simulate(n_cells=200, n_genes=40, n_peaks=300, n_proteins=8, n_linked_genes=5, peaks_per_linked_gene=3)
    assert isinstance(m, md.MuData) and list(m.mod) == ["rna", "atac", "protein"]
    atac = m["atac"]
    assert {"chrom", "start", "end", "linked_gene"} <= set(atac.var.columns)
    linked = atac.var[atac.var["linked_gene"] != ""]
    assert len(linked) == 15
    genes = m["rna"].var
    for peak, row in linked.iterrows():
        g = genes.loc[row["linked_gene"]]
        assert row["chrom"] == g["chrom"] and abs(row["start"] - g["tss"]) <= 50_000
    assert m.obsm["true_latent"].shape == (200, 10)
    # ATAC is sparse with low counts, protein dense with high counts
    assert (atac.X.toarray() == 0).mean() > 0.5
    assert np.median(np.asarray(m["protein"].X.sum(1))) > 1000


def test_linked_peaks_correlate_with_their_gene():
    m = atlasdgd.simulate(n_cells=3000, n_genes=200, n_peaks=2000, n_linked_genes=10, peaks_per_linked_gene=5, seed=4)
    rna = np.log1p(m["rna"].X.toarray() / m["rna"].X.sum(1).A * 1e4)
    atac = m["atac"].X.toarray()
    var = m["atac"].var
    gene = var.loc[var["linked_gene"] != "", "linked_gene"].iloc[0]
    g = m["rna"].var_names.get_loc(gene)
    linked = np.flatnonzero(var["linked_gene"].to_numpy() == gene)
    unlinked = np.flatnonzero(var["linked_gene"].to_numpy() == "")[:200]
    corr = lambda j: stats.spearmanr(rna[:, g], atac[:, j])[0]  # noqa: E731
    assert np.mean([abs(corr(j)) for j in linked]) > 2 * np.mean([abs(np.nan_to_num(corr(j))) for j in unlinked])


def test_chunked_file_equals_in_memory(tmp_path):
    cfg = SimulationConfig(n_cells=CHUNK_CELLS + 100, n_genes=30, n_peaks=60, n_linked_genes=2, peaks_per_linked_gene=2, seed=5)
    write_simulation(cfg, str(tmp_path / "s.h5mu"), progress=False)
    disk, mem = md.read_h5mu(tmp_path / "s.h5mu"), atlasdgd.simulate(cfg)
    for m in ("rna", "atac"):
        assert (disk[m].X != mem[m].X).nnz == 0
        assert disk[m].var.equals(mem[m].var)
    assert list(disk.obs_names) == list(mem.obs_names)
    cfg1 = SimulationConfig(n_cells=500, n_genes=30, seed=5)
    write_simulation(cfg1, str(tmp_path / "s.h5ad"), progress=False)
    assert (ad.read_h5ad(tmp_path / "s.h5ad").X != atlasdgd.simulate(cfg1).X).nnz == 0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_cells"):
        SimulationConfig(n_cells=0)
    with pytest.raises(ValueError, match=".h5mu"):
        write_simulation(SimulationConfig(n_cells=10, n_genes=5, n_peaks=20, n_linked_genes=1, peaks_per_linked_gene=1),
                         str(tmp_path / "x.h5ad"), progress=False)
    assert list(tmp_path.iterdir()) == []
