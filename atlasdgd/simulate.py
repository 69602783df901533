"""Synthetic atlases with known truth, generated chunk by chunk.

Cell types are clusters in a true latent space; a random non-linear map (one tanh layer) turns a
cell's latent position into expression fractions per modality; each batch multiplies every feature
by its own log-normal factor; library sizes are log-normal; counts are negative-binomial with a
dispersion per feature. RNA is always simulated; an ATAC-like modality (many features, low counts,
with peaks near the TSS of some genes sharing those genes' loadings: known gene-to-peak links) and
a protein-like modality (few features, high counts) are optional.

Everything is a pure function of the seed: global parameters come from one stream, and cells come
in fixed-size chunks, each from its own stream, so memory does not grow with the number of cells.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

CHUNK_CELLS = 4096  # fixed: part of what makes output a function of the seed alone


@dataclass
class SimulationConfig:
    n_cells: int = 5000
    n_types: int = 8
    n_batches: int = 3
    n_genes: int = 2000
    n_peaks: int = 0
    n_proteins: int = 0
    latent_dim: int = 10  # dimension of the true latent space
    type_spread: float = 2.5  # sd of type centres (cells scatter with sd 1 around them)
    signal: float = 1.5  # scale of the latent -> log-fraction map
    batch_effect: float = 0.5  # sd of per-batch log fold changes
    # per-batch multipliers of batch_effect (empty: all 1); e.g. (1, 1, 1, 4) makes the last batch a
    # different protocol: gene-specific log fold changes four times as large as between the others
    batch_scale: tuple[float, ...] = ()
    rna_library: float = 3000.0  # median counts per cell
    atac_library: float = 400.0
    protein_library: float = 2000.0
    library_sd: float = 0.4  # sd of log library size
    n_linked_genes: int = 20  # genes with linked peaks (ATAC only)
    peaks_per_linked_gene: int = 5
    seed: int = 0

    def __post_init__(self):
        for name in ("n_cells", "n_types", "n_batches", "n_genes", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.batch_scale = tuple(float(v) for v in self.batch_scale)
        if self.batch_scale and (len(self.batch_scale) != self.n_batches or min(self.batch_scale) < 0):
            raise ValueError(f"batch_scale needs {self.n_batches} non-negative multipliers (one per batch), "
                             f"got {self.batch_scale}")
        if self.n_peaks < 0 or self.n_proteins < 0:
            raise ValueError("n_peaks and n_proteins must be >= 0")
        if self.n_peaks and self.n_linked_genes * self.peaks_per_linked_gene > self.n_peaks:
            raise ValueError("n_linked_genes * peaks_per_linked_gene must not exceed n_peaks")
        if self.n_linked_genes > self.n_genes:
            raise ValueError("n_linked_genes must not exceed n_genes")

    @property
    def modalities(self) -> list[str]:
        return ["rna"] + (["atac"] if self.n_peaks else []) + (["protein"] if self.n_proteins else [])


_HIDDEN = 64
_CHROMS = [f"chr{i}" for i in range(1, 6)]


@dataclass
class _Truth:
    """Global parameters of a simulation (drawn once from the seed)."""

    type_centres: np.ndarray
    type_probs: np.ndarray
    a: np.ndarray
    b: np.ndarray
    loadings: dict[str, np.ndarray]
    base: dict[str, np.ndarray]
    batch_shift: dict[str, np.ndarray]
    dispersion: dict[str, np.ndarray]
    var: dict[str, pd.DataFrame]


def _truth(cfg: SimulationConfig) -> _Truth:
    rng = np.random.default_rng([cfg.seed, 0])
    d = cfg.latent_dim
    centres = rng.normal(0.0, cfg.type_spread, (cfg.n_types, d))
    probs = rng.dirichlet(np.full(cfg.n_types, 3.0))
    a = rng.normal(0.0, 1.0 / np.sqrt(d), (d, _HIDDEN))
    b = rng.normal(0.0, 0.5, _HIDDEN)
    sizes = {"rna": cfg.n_genes, "atac": cfg.n_peaks, "protein": cfg.n_proteins}
    base_sd = {"rna": 1.0, "atac": 0.5, "protein": 1.0}
    signal = {"rna": cfg.signal, "atac": 0.7 * cfg.signal, "protein": 1.5 * cfg.signal}
    batch_sd = {"rna": cfg.batch_effect, "atac": 0.5 * cfg.batch_effect, "protein": 0.5 * cfg.batch_effect}
    disp = {"rna": (np.log(2.0), 0.5), "atac": (np.log(1.0), 0.3), "protein": (np.log(10.0), 0.3)}
    loadings, base, shift, dispersion, var = {}, {}, {}, {}, {}
    for m in cfg.modalities:
        f = sizes[m]
        loadings[m] = rng.normal(0.0, signal[m] / np.sqrt(_HIDDEN), (_HIDDEN, f))
        base[m] = rng.normal(0.0, base_sd[m], f)
        shift[m] = rng.normal(0.0, batch_sd[m], (cfg.n_batches, f))
        if cfg.batch_scale:  # scaled after the draw, so the rest of the simulation stays the same
            shift[m] *= np.asarray(cfg.batch_scale)[:, None]
        dispersion[m] = np.exp(rng.normal(*disp[m], f))

    genes = pd.DataFrame(
        {"chrom": rng.choice(_CHROMS, cfg.n_genes), "tss": rng.integers(1_000_000, 100_000_000, cfg.n_genes)},
        index=[f"gene_{i:05d}" for i in range(cfg.n_genes)],
    )
    genes["linked_peaks"] = 0
    var["rna"] = genes
    if cfg.n_peaks:
        linked_gene = np.full(cfg.n_peaks, "", dtype=object)
        chrom = rng.choice(_CHROMS, cfg.n_peaks).astype(object)
        start = rng.integers(1_000_000, 100_000_000, cfg.n_peaks)
        gene_idx = rng.choice(cfg.n_genes, cfg.n_linked_genes, replace=False)
        peak_idx = rng.choice(cfg.n_peaks, cfg.n_linked_genes * cfg.peaks_per_linked_gene, replace=False)
        for k, g in enumerate(gene_idx):
            peaks = peak_idx[k * cfg.peaks_per_linked_gene : (k + 1) * cfg.peaks_per_linked_gene]
            # a linked peak follows its gene's program, so gene and peaks co-vary across cells
            loadings["atac"][:, peaks] = loadings["rna"][:, [g]] + rng.normal(0, 0.1 * signal["atac"] / np.sqrt(_HIDDEN), (_HIDDEN, len(peaks)))
            linked_gene[peaks] = genes.index[g]
            chrom[peaks] = genes["chrom"].iloc[g]
            start[peaks] = genes["tss"].iloc[g] + rng.integers(-50_000, 50_000, len(peaks))
            genes.iloc[g, genes.columns.get_loc("linked_peaks")] = len(peaks)
        end = start + 500
        var["atac"] = pd.DataFrame(
            {"chrom": chrom, "start": start, "end": end, "linked_gene": linked_gene},
            index=[f"{c}:{s}-{e}" for c, s, e in zip(chrom, start, end)],
        )
        if var["atac"].index.duplicated().any():  # vanishingly rare; keep names unique
            var["atac"].index = [f"{n}_{i}" for i, n in enumerate(var["atac"].index)]
    if cfg.n_proteins:
        var["protein"] = pd.DataFrame(index=[f"protein_{i:03d}" for i in range(cfg.n_proteins)])
    return _Truth(centres, probs, a, b, loadings, base, shift, dispersion, var)


def _nb_sample(rng: np.random.Generator, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Negative-binomial draws as a gamma-Poisson mixture."""
    return rng.poisson(rng.gamma(shape=r, scale=mu / r))


def _library_median(cfg: SimulationConfig, m: str) -> float:
    return {"rna": cfg.rna_library, "atac": cfg.atac_library, "protein": cfg.protein_library}[m]


def iter_chunks(cfg: SimulationConfig, truth: _Truth | None = None) -> Iterator[tuple[pd.DataFrame, dict[str, sparse.csr_matrix], np.ndarray]]:
    """Yield (obs, counts per modality, true latent) for consecutive chunks of cells."""
    truth = truth or _truth(cfg)
    for chunk, start in enumerate(range(0, cfg.n_cells, CHUNK_CELLS)):
        n = min(CHUNK_CELLS, cfg.n_cells - start)
        rng = np.random.default_rng([cfg.seed, 1, chunk])
        types = rng.choice(cfg.n_types, n, p=truth.type_probs)
        batches = rng.integers(0, cfg.n_batches, n)
        z = truth.type_centres[types] + rng.normal(0.0, 1.0, (n, cfg.latent_dim))
        h = np.tanh(z @ truth.a + truth.b)
        counts = {}
        for m in cfg.modalities:
            logits = truth.base[m] + h @ truth.loadings[m] + truth.batch_shift[m][batches]
            logits -= logits.max(axis=1, keepdims=True)
            frac = np.exp(logits)
            frac /= frac.sum(axis=1, keepdims=True)
            lib = np.exp(rng.normal(np.log(_library_median(cfg, m)), cfg.library_sd, n))
            x = _nb_sample(rng, frac * lib[:, None], truth.dispersion[m][None, :])
            counts[m] = sparse.csr_matrix(x.astype(np.float32))
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical([f"type_{t}" for t in types], categories=[f"type_{t}" for t in range(cfg.n_types)]),
                "batch": pd.Categorical([f"batch_{b}" for b in batches], categories=[f"batch_{b}" for b in range(cfg.n_batches)]),
            },
            index=[f"cell_{start + i:08d}" for i in range(n)],
        )
        yield obs, counts, z.astype(np.float32)


def simulate(cfg: SimulationConfig | None = None, **kwargs):
    """Simulate in memory: AnnData for RNA only, MuData when ATAC or protein is requested.

    ``obs`` has ``cell_type`` and ``batch``; ``obsm['true_latent']`` the true position; the ATAC
    ``var`` has coordinates and ``linked_gene``; ``uns['simulation']`` the settings as JSON.
    """
    import anndata as ad

    cfg = cfg or SimulationConfig(**kwargs)
    truth = _truth(cfg)
    parts = list(iter_chunks(cfg, truth))
    obs = pd.concat([p[0] for p in parts])
    latent = np.concatenate([p[2] for p in parts])
    mods = {}
    for m in cfg.modalities:
        x = sparse.vstack([p[1][m] for p in parts], format="csr")
        mods[m] = ad.AnnData(X=x, obs=obs.copy(), var=truth.var[m].copy(), obsm={"true_latent": latent})
    uns = {"simulation": json.dumps(dataclasses.asdict(cfg))}
    if len(mods) == 1:
        out = mods["rna"]
        out.uns.update(uns)
        return out
    import mudata

    md = mudata.MuData(mods)
    md.obs = obs.copy()
    md.obsm["true_latent"] = latent
    md.uns.update(uns)
    return md


def _write_anndata_group(group, obs: pd.DataFrame, var: pd.DataFrame, obsm: dict, uns: dict) -> None:
    from anndata.io import write_elem

    write_elem(group, "obs", obs)
    write_elem(group, "var", var)
    write_elem(group, "obsm", obsm)
    for key in ("varm", "obsp", "varp", "layers"):
        write_elem(group, key, {})
    write_elem(group, "uns", uns)
    group.attrs["encoding-type"] = "anndata"
    group.attrs["encoding-version"] = "0.1.0"


def write_simulation(cfg: SimulationConfig, path: str, overwrite: bool = False, progress: bool = True) -> str:
    """Simulate straight to an .h5ad (RNA only) or .h5mu file, one chunk of cells at a time.

    Counts are appended chunk by chunk, so memory stays at one chunk of counts plus the obs table.
    The file appears only when complete (written to a temporary name, then renamed).
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem
    from tqdm.auto import tqdm

    from atlasdgd.io.atomic import atomic_file

    multi = len(cfg.modalities) > 1
    if multi and not str(path).endswith(".h5mu"):
        raise ValueError(f"{cfg.modalities} is multi-modal: write it to a path ending in .h5mu")
    if not multi and not str(path).endswith((".h5ad", ".h5mu")):
        raise ValueError("write the simulation to a path ending in .h5ad (or .h5mu)")
    as_mudata = str(path).endswith(".h5mu")
    truth = _truth(cfg)
    uns = {"simulation": json.dumps(dataclasses.asdict(cfg))}
    n_chunks = -(-cfg.n_cells // CHUNK_CELLS)
    with atomic_file(path, overwrite) as tmp:
        with h5py.File(tmp, "w", userblock_size=512 if as_mudata else 0) as f:
            groups = {m: (f.require_group(f"mod/{m}") if as_mudata else f) for m in cfg.modalities}
            obs_parts, latent_parts = [], []
            chunks = iter_chunks(cfg, truth)
            for i, (obs, counts, z) in enumerate(tqdm(chunks, total=n_chunks, desc="simulating", unit="chunk", disable=not progress)):
                for m, x in counts.items():
                    if i == 0:
                        write_elem(groups[m], "X", x)
                    else:
                        sparse_dataset(groups[m]["X"]).append(x)
                obs_parts.append(obs)
                latent_parts.append(z)
            obs = pd.concat(obs_parts)
            obsm = {"true_latent": np.concatenate(latent_parts)}
            for m in cfg.modalities:
                _write_anndata_group(groups[m], obs, truth.var[m], obsm, uns if not as_mudata else {})
            if as_mudata:
                n = len(obs)
                var_names = np.concatenate([truth.var[m].index.to_numpy() for m in cfg.modalities])
                write_elem(f, "obs", obs)
                write_elem(f, "var", pd.DataFrame(index=pd.Index(var_names.astype(str))))
                write_elem(f, "obsm", obsm)
                for key in ("varm", "obsp", "varp"):
                    write_elem(f, key, {})
                write_elem(f, "uns", uns)
                write_elem(f, "obsmap", {m: np.arange(1, n + 1) for m in cfg.modalities})
                varmap, offset = {}, 0
                for m in cfg.modalities:
                    vm = np.zeros(len(var_names), dtype=np.int64)
                    size = len(truth.var[m])
                    vm[offset : offset + size] = np.arange(1, size + 1)
                    varmap[m], offset = vm, offset + size
                write_elem(f, "varmap", varmap)
                f["mod"].attrs["mod-order"] = cfg.modalities
                f.attrs.update({"axis": 0, "encoding-type": "MuData", "encoding-version": "0.1.0"})
        if as_mudata:
            with open(tmp, "r+b") as fh:
                header = b"MuData (format-version=0.1.0;creator=atlasdgd)"
                fh.write(header + b"\0" * (512 - len(header)))
    return str(path)


def write_simulation_store(cfg: SimulationConfig, uri: str, overwrite: bool = False, progress: bool = True,
                           split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                           storage_options: dict | None = None) -> str:
    """Simulate straight into an atlas store (label ``cell_type``, covariate ``batch``, stratified
    split), one chunk of cells at a time: memory stays at one chunk plus the cell table."""
    from tqdm.auto import tqdm

    from atlasdgd import __version__
    from atlasdgd.data.cells import SPLIT_KEY
    from atlasdgd.data.split import as_split_categorical, stratified_split
    from atlasdgd.store.format import StoreManifest
    from atlasdgd.store.zarr_store import StoreWriter

    truth = _truth(cfg)
    expected = {"rna": cfg.rna_library, "atac": cfg.atac_library, "protein": cfg.protein_library}
    sizes = {m: len(truth.var[m]) for m in cfg.modalities}
    # expected non-zeros per cell only size the chunks: at most the library, at most the features
    writer = StoreWriter(uri, cfg.n_cells, {m: (sizes[m], min(sizes[m], expected[m])) for m in cfg.modalities},
                         chunk_cells=CHUNK_CELLS, overwrite=overwrite, storage_options=storage_options)
    try:
        obs_parts, libraries = [], {m: [] for m in cfg.modalities}
        detected = {m: np.zeros(sizes[m], np.int64) for m in cfg.modalities}
        totals = {m: np.zeros(sizes[m]) for m in cfg.modalities}
        n_chunks = -(-cfg.n_cells // CHUNK_CELLS)
        for obs, counts, _ in tqdm(iter_chunks(cfg, truth), total=n_chunks, desc="simulating", unit="chunk",
                                   disable=not progress):
            for m, x in counts.items():
                writer.append(m, x)
                libraries[m].append(np.asarray(x.sum(axis=1)).ravel())
                detected[m] += np.bincount(x.indices, minlength=sizes[m])
                totals[m] += np.asarray(x.sum(axis=0)).ravel()
            obs_parts.append(obs)
        obs = pd.concat(obs_parts)
        strata = obs["cell_type"].astype(str) + "|" + obs["batch"].astype(str)
        obs[SPLIT_KEY] = as_split_categorical(stratified_split(strata, len(obs), split_fractions, cfg.seed))
        for m in cfg.modalities:
            obs[f"library_{m}"] = np.concatenate(libraries[m]).astype(np.float32)
            obs[f"observed_{m}"] = True
        var = {m: truth.var[m].assign(n_cells_detected=detected[m], total_counts=totals[m]) for m in cfg.modalities}
        manifest = StoreManifest(
            n_cells=cfg.n_cells, modalities={m: {"n_features": sizes[m], "nnz": int(detected[m].sum())} for m in cfg.modalities},
            label_key="cell_type", covariate_keys=["batch"], obs_columns=list(obs.columns), chunk_cells=CHUNK_CELLS,
            source=f"atlasdgd simulate {json.dumps(dataclasses.asdict(cfg))}", atlasdgd_version=__version__,
        )
        return writer.finish(obs, var, manifest)
    except BaseException:
        writer.abort()
        raise
