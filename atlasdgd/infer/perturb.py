"""Gene-to-feature association by in-silico perturbation (spec section 2.4).

For the cells that express gene g: set x_g = 0, take ``steps`` Adam steps on the basal representation
using only gene g's reconstruction loss, decode, and record delta = y_perturbed - y_original for every
feature of every modality (normalised fractions). The covariate blocks stay put: knocking a gene down
does not change a cell's batch. A negative delta on a peak suggests the peak goes with the gene.
Deltas are averaged per cell group; features with coordinates get their distance to the gene's TSS.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from atlasdgd.errors import InputError
from atlasdgd.runtime.device import on_device_of, to_numpy
from atlasdgd.model.module import DGDModule
from atlasdgd.model.nb import nb_log_prob


def _perturbed(module: DGDModule, z0: torch.Tensor, modality: str, gene: int, library: torch.Tensor,
               steps: int, lr: float, betas: tuple[float, float]) -> torch.Tensor:
    """Representations after ``steps`` fresh-Adam steps on the basal block towards x_g = 0."""
    L = module.config.latent_dim
    basal = z0[:, :L].clone().requires_grad_(True)
    rest = z0[:, L:]
    opt = torch.optim.Adam([basal], lr=lr, betas=betas)
    r = module.dispersion(modality)[gene].detach()
    for _ in range(steps):
        log_y = module.log_fractions(torch.cat([basal, rest], 1), [modality])[modality][:, gene]
        mu = torch.exp(log_y) * library
        loss = -nb_log_prob(torch.zeros_like(mu), mu, r).sum()
        (basal.grad,) = torch.autograd.grad(loss, basal)  # the model's parameters get no gradient
        opt.step()
    return torch.cat([basal.detach(), rest], 1)


def perturb_genes(
    module: DGDModule,
    data,
    values: np.ndarray,
    genes: list[str],
    feature_names: dict[str, list[str]],
    groups: np.ndarray | None = None,
    modality: str | None = None,
    steps: int = 1,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.5, 0.7),
    batch_size: int = 256,
) -> pd.DataFrame:
    """Mean delta per (gene, group, feature): columns gene, group, modality, feature, mean_delta, n_cells.

    Args:
        data: the query (:class:`~atlasdgd.infer.query.Query`) whose cells are at ``values``.
        modality: the modality of the genes (default: the model's first).
    """
    modality = modality or next(iter(module.config.modalities))
    if modality not in data.counts:
        raise InputError(f"the query has no {modality!r} counts to perturb: pass cells measured on {modality!r}")
    names = pd.Index(feature_names[modality])
    measured = set(data.features[modality].tolist())
    gene_idx = {}
    for g in genes:
        if g not in names:
            raise InputError(f"gene {g!r} is not one of the model's {modality!r} features (for example {names[0]!r})")
        gene_idx[g] = int(names.get_loc(g))
        if gene_idx[g] not in measured:
            raise InputError(f"gene {g!r} is not measured in the query: perturbation needs cells that express it")
    groups = np.full(data.n_cells, "all", dtype=object) if groups is None else np.asarray(groups, dtype=object)
    group_names = pd.unique(groups)
    col_of = {int(f): j for j, f in enumerate(data.features[modality])}
    values_t = on_device_of(module, values)
    device = values_t.device
    mods = list(module.config.modalities)
    frames = []
    module.eval()
    for g, gi in gene_idx.items():
        x_g = np.asarray(data.counts[modality][:, col_of[gi]].todense()).ravel()
        rows = np.flatnonzero(x_g > 0)
        sums = {m: np.zeros((len(group_names), module.config.modalities[m])) for m in mods}
        n_cells = np.zeros(len(group_names), dtype=np.int64)
        if len(rows):
            loader = data.loader(rows, batch_size, shuffle=False, device=device)
            for batch in loader:
                cells = rows[to_numpy(batch.index)]
                z0 = values_t[torch.from_numpy(cells).to(device)]
                lib = batch.library[modality] - torch.from_numpy(x_g[cells].astype(np.float32)).to(device)
                z1 = _perturbed(module, z0, modality, gi, lib.clamp_min(1.0), steps, lr, betas)
                with torch.no_grad():
                    y0 = module.log_fractions(z0)
                    y1 = module.log_fractions(z1)
                gcode = pd.Index(group_names).get_indexer(groups[cells])
                n_cells += np.bincount(gcode, minlength=len(group_names))
                for m in mods:
                    delta = to_numpy(torch.exp(y1[m]) - torch.exp(y0[m]))
                    np.add.at(sums[m], gcode, delta)
        for m in mods:
            mean = sums[m] / np.maximum(n_cells, 1)[:, None]
            f = len(feature_names[m])
            frames.append(pd.DataFrame({
                "gene": g,
                "group": np.repeat(group_names.astype(str), f),
                "modality": m,
                "feature": np.tile(np.asarray(feature_names[m], dtype=object), len(group_names)),
                "mean_delta": mean.ravel(),
                "n_cells": np.repeat(n_cells, f),
            }))
    return pd.concat(frames, ignore_index=True)


def feature_positions(var: pd.DataFrame) -> pd.DataFrame | None:
    """``chrom`` and centre ``position`` of features from var columns (chrom/start/end) or names
    like ``chr1:100-600`` / ``chr1_100_600``; None when neither is there."""
    if {"chrom", "start", "end"} <= set(var.columns):
        return pd.DataFrame({"chrom": var["chrom"].astype(str).to_numpy(),
                             "position": (var["start"].to_numpy(float) + var["end"].to_numpy(float)) / 2}, index=var.index)
    parts = pd.Series(var.index.astype(str)).str.extract(r"^(?P<chrom>[^:_]+)[:_](?P<start>\d+)[-_](?P<end>\d+)$")
    if parts["chrom"].notna().mean() < 0.9:
        return None
    pos = (parts["start"].astype(float) + parts["end"].astype(float)) / 2
    return pd.DataFrame({"chrom": parts["chrom"].to_numpy(), "position": pos.to_numpy()}, index=var.index)


def add_tss_distance(table: pd.DataFrame, gene_var: pd.DataFrame, feature_var: dict[str, pd.DataFrame],
                     tss_key: str = "tss", chrom_key: str = "chrom") -> pd.DataFrame:
    """Add ``distance_to_tss`` (feature centre - gene TSS, NaN on other chromosomes or without
    coordinates) when the genes' var has a TSS column."""
    if tss_key not in gene_var.columns or chrom_key not in gene_var.columns:
        return table
    table = table.copy()
    table["distance_to_tss"] = np.nan
    for m, var in feature_var.items():
        pos = feature_positions(var)
        if pos is None:
            continue
        for g in table["gene"].unique():
            if g not in gene_var.index:
                continue
            sel = ((table["gene"] == g) & (table["modality"] == m)).to_numpy()
            feats = pos.reindex(table.loc[sel, "feature"].to_numpy())
            same = (feats["chrom"] == str(gene_var.at[g, chrom_key])).to_numpy()
            dist = np.where(same, feats["position"].to_numpy() - float(gene_var.at[g, tss_key]), np.nan)
            table.loc[sel, "distance_to_tss"] = dist
    return table


def perturb_query(module: DGDModule, features: dict[str, list[str]], query, genes, options, *,
                  group_by: str | None = None, steps: int = 1, lr: float = 1e-2, modality: str | None = None,
                  layer=None, modality_key: str | None = None, min_overlap: float = 0.5,
                  covariates: dict[str, list[str]] | None = None, progress: bool = False) -> pd.DataFrame:
    """Map a query AnnData/MuData, knock down each gene (:func:`perturb_genes`), and add
    distance_to_tss when the query's var has coordinates (see :meth:`atlasdgd.DGD.perturb`)."""
    from atlasdgd.infer.mapping import map_cells
    from atlasdgd.infer.query import align_query

    genes = [genes] if isinstance(genes, str) else list(genes)
    if group_by is not None and group_by not in query.obs.columns:
        raise InputError(f"group-by key {group_by!r} is not a column of the query's obs "
                         f"(columns: {list(query.obs.columns)[:20]})")
    gene_modality = modality or next((m for m, f in features.items() if genes and genes[0] in f), next(iter(features)))
    aligned = align_query(query, features, covariates or {}, layer=layer, modality=gene_modality,
                          modality_key=modality_key, min_overlap=min_overlap)
    mapping = map_cells(module, aligned, options, progress=progress)
    groups = None if group_by is None else aligned.obs[group_by].astype(str).to_numpy()
    table = perturb_genes(module, aligned, mapping.values, genes, features, groups, modality=gene_modality,
                          steps=steps, lr=lr, betas=options.betas)
    feature_var = {m: a.var for m, a in query.mod.items()} if hasattr(query, "mod") else {gene_modality: query.var}
    if gene_modality in feature_var:
        table = add_tss_distance(table, feature_var[gene_modality], feature_var)
    return table
