"""Plots written next to models and demo outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: pd.DataFrame, path: str | Path) -> None:
    """Training and validation reconstruction loss (NB NLL per feature) and the objective per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for col, style in (("train_recon", "-"), ("val_recon", "--")):
        if col in history:
            axes[0].plot(history["epoch"], history[col], style, label=col.replace("_", " "))
    if "best" in history and history["best"].any():
        best = history.loc[history["best"].astype(bool), "epoch"].iloc[0]
        axes[0].axvline(best, color="grey", lw=0.8, ls=":", label=f"best epoch {best}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("NB NLL per feature")
    axes[0].legend()
    axes[1].plot(history["epoch"], history["train_loss"])
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("objective per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embedding(coords: np.ndarray, colours: dict[str, pd.Series], path: str | Path, title: str = "") -> None:
    """One scatter panel per categorical colouring of the same 2-D coordinates."""
    plt = _pyplot()
    n = len(colours)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], colours.items()):
        _scatter_categories(plt, ax, coords, values)
        ax.set_title(f"{title} {name}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the `atlasdgd plot` kinds: each takes arrays and tables (no model object), writes one PNG ------------
FIGSIZE = {"umap": (4.6, 4.2), "clusters": (7.0, 5.0), "covariates": (4.6, 4.2), "training": (10, 3.6),
           "gene-to-peak": (9.0, 2.6)}
DPI = 110


def umap_coordinates(x: np.ndarray, extra: np.ndarray | None = None, seed: int = 0):
    """2-D UMAP of ``x`` (and ``extra`` points placed in the same map, e.g. component means); principal
    components when umap-learn is not installed (the title says which)."""
    try:
        import umap
    except ImportError:
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=seed).fit(x)
        return pca.transform(x), None if extra is None else pca.transform(extra), "PCA (pip install 'atlasdgd[plot]' for UMAP)"
    reducer = umap.UMAP(random_state=seed, n_jobs=1).fit(x)
    return reducer.embedding_, None if extra is None else reducer.transform(extra), "UMAP"


def plot_umap(embedding: np.ndarray, obs: pd.DataFrame, color: list[str], path: str | Path,
              means: np.ndarray | None = None, seed: int = 0) -> None:
    """UMAP of representations, one panel per obs column in ``color``, the mixture's component means
    marked (x, numbered). Same keys as scanpy: ``sc.pl.embedding(adata, "X_dgd")`` works on the data too."""
    plt = _pyplot()
    coords, centre, method = umap_coordinates(embedding, means, seed)
    w, h = FIGSIZE["umap"]
    fig, axes = plt.subplots(1, len(color), figsize=(w * len(color), h), squeeze=False)
    for ax, key in zip(axes[0], color):
        _scatter_categories(plt, ax, coords, obs[key])
        if centre is not None:
            ax.scatter(centre[:, 0], centre[:, 1], marker="x", s=40, color="black", lw=1.2)
            for k, (cx, cy) in enumerate(centre):
                ax.annotate(str(k), (cx, cy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{method}: {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_clusters(clusters: pd.Series, labels: pd.Series, path: str | Path, component_labels=None) -> None:
    """Heatmap of cells per (mixture component, label), each row normalised: which labels each
    component holds. ``component_labels`` names the rows where the model has a label per component."""
    plt = _pyplot()
    table = pd.crosstab(pd.Series(np.asarray(clusters), name="component"), pd.Series(np.asarray(labels), name="label"))
    frac = table.div(table.sum(axis=1).clip(lower=1), axis=0)
    fig, ax = plt.subplots(figsize=FIGSIZE["clusters"])
    im = ax.imshow(frac.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(frac.shape[1]), [str(c) for c in frac.columns], rotation=90, fontsize=7)
    names = [str(k) if component_labels is None or component_labels[int(k)] is None
             else f"{k} ({component_labels[int(k)]})" for k in frac.index]
    ax.set_yticks(range(frac.shape[0]), names, fontsize=7)
    ax.set_xlabel(labels.name if getattr(labels, "name", None) else "label")
    ax.set_ylabel("mixture component")
    fig.colorbar(im, ax=ax, label="fraction of the component's cells")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_covariates(spaces: dict[str, tuple[np.ndarray, pd.Series, np.ndarray, list[str]]], path: str | Path) -> None:
    """Each covariate's representation space (2-D: first two dimensions), cells coloured by class,
    the class means marked. ``spaces``: covariate -> (coords [N, d], class per cell, means [C, d], class names)."""
    plt = _pyplot()
    w, h = FIGSIZE["covariates"]
    fig, axes = plt.subplots(1, max(1, len(spaces)), figsize=(w * max(1, len(spaces)), h), squeeze=False)
    for ax, (key, (coords, classes, means, names)) in zip(axes[0], spaces.items()):
        _scatter_categories(plt, ax, coords[:, :2], classes)
        ax.scatter(means[:, 0], means[:, 1], marker="x", s=50, color="black", lw=1.5)
        for name, (cx, cy) in zip(names, means[:, :2]):
            ax.annotate(str(name), (cx, cy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"covariate {key}")
    if not spaces:
        axes[0][0].text(0.5, 0.5, "the model has no covariates", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_gene_to_peak(table: pd.DataFrame, path: str | Path, genes: list[str] | None = None, modality: str | None = None,
                      window: float = 500_000) -> None:
    """Gene-to-peak tracks from ``perturb`` output: for each gene, the mean change of every feature
    within ``window`` bases along the genome. Centred on the gene's TSS (x: distance to it) when the
    table has ``distance_to_tss``; otherwise on the most affected feature whose name or var gives a
    position (``chr1:100-600``, ``chr1_100_600``), e.g. when the genes' var has no TSS."""
    from atlasdgd.infer.perturb import feature_positions

    plt = _pyplot()
    rows = table if modality is None else table[table["modality"] == modality]
    genes = genes or list(dict.fromkeys(rows["gene"]))
    unknown = [g for g in genes if g not in set(rows["gene"])]
    if unknown:
        raise ValueError(f"genes {unknown} are not in the perturb table (it has {sorted(set(rows['gene']))[:10]})")
    w, h = FIGSIZE["gene-to-peak"]
    fig, axes = plt.subplots(len(genes), 1, figsize=(w, h * len(genes)), squeeze=False)
    for ax, g in zip(axes[:, 0], genes):
        mine = rows[rows["gene"] == g].groupby("feature", as_index=False).agg(
            delta=("mean_delta", "mean"), distance=("distance_to_tss", "first") if "distance_to_tss" in rows else
            ("mean_delta", lambda v: np.nan))
        if mine["distance"].notna().any():
            near = mine[mine["distance"].abs() <= window]
            x, label = near["distance"] / 1000, f"distance to the {g} TSS (kb)"
        else:
            pos = feature_positions(pd.DataFrame(index=mine["feature"].astype(str)))
            if pos is None:
                raise ValueError(f"no feature of {g}'s table rows has a genomic position (names like chr1:100-600 "
                                 "or chr1_100_600, or a TSS in the genes' var)")
            mine = mine.assign(chrom=pos["chrom"].to_numpy(), position=pos["position"].to_numpy())
            top = mine.loc[mine["delta"].abs().idxmax()]
            near = mine[(mine["chrom"] == top["chrom"]) & ((mine["position"] - top["position"]).abs() <= window)]
            x, label = near["position"] / 1e6, f"{top['chrom']} position (Mb), around the most affected feature"
            near = near.assign(distance=near["position"])
        ax.axhline(0, color="grey", lw=0.6)
        ax.vlines(x, 0, near["delta"], color="tab:blue", lw=1)
        ax.set_title(f"{g} knocked down: mean change of nearby features", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("mean delta")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_model(model, kind: str, path: str | Path, color: list[str] | None = None, max_cells: int = 20000,
               seed: int = 0) -> None:
    """A plot of a trained :class:`~atlasdgd.DGD` (anything with its ``embed()``, ``module``, ``vocab`` and
    ``history``): ``umap`` (coloured by ``color``, default the label and covariates, component means
    marked), ``clusters`` (components vs ``color[0]``, default the label), ``covariates`` or ``training``."""
    cells, vocab = model.embed(), model.vocab
    if kind == "training":
        plot_history(model.history, path)
    elif kind == "umap":
        color = list(color or [k for k in [vocab.label_key, *vocab.covariates, "dgd_cluster"] if k])
        missing = [c for c in color if c not in cells.obs]
        if missing:
            raise ValueError(f"colour keys {missing} are not obs columns of the model's cells ({list(cells.obs.columns)})")
        pick = np.sort(np.random.default_rng(seed).permutation(cells.n_obs)[:max_cells])
        sample = cells[pick]
        plot_umap(sample.obsm["X_dgd"], sample.obs, color, path, means=model.module.basal.means.detach().cpu().numpy(),
                  seed=seed)
    elif kind == "clusters":
        key = (list(color or []) or [vocab.label_key])[0]
        if key is None or key not in cells.obs:
            raise ValueError("the clusters plot compares components with labels: the model has no label key; "
                             "pass an obs column as colour")
        plot_clusters(cells.obs["dgd_cluster"], cells.obs[key].rename(key), path,
                      vocab.component_labels if key == vocab.label_key else None)
    elif kind == "covariates":
        spaces = {k: (cells.obsm[f"X_dgd_{k}"], cells.obs[k] if k in cells.obs else cells.obs[f"dgd_{k}"],
                      model.module.covariate_gmms[k].means.detach().cpu().numpy(), list(vocab.covariates[k]))
                  for k in vocab.covariates}
        plot_covariates(spaces, path)
    else:
        raise ValueError(f"unknown plot kind {kind!r}: umap, clusters, covariates or training "
                         "(gene-to-peak: plot_gene_to_peak on perturb output)")


def _scatter_categories(plt, ax, coords: np.ndarray, values) -> None:
    """One colour per category of ``values``, legend up to 20 categories, no ticks."""
    cats = pd.Categorical(values)
    cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
    for k, cat in enumerate(cats.categories):
        sel = cats.codes == k
        ax.scatter(coords[sel, 0], coords[sel, 1], s=2, color=cmap(k % cmap.N), label=str(cat), rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(cats.categories) <= 20:
        ax.legend(markerscale=4, fontsize=7, loc="best", frameon=False)
