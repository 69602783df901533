"""Synthetic cells from a trained model (spec section 2.5): z from the mixture, counts from the NB heads."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

from atlasdgd.errors import AtlasDGDError


def _component_index(model, component) -> int | None:
    if component is None:
        return None
    if isinstance(component, str):
        labels = model.vocab.component_labels
        if component not in labels:
            raise AtlasDGDError(f"no component carries label {component!r} (labels: {sorted({lab for lab in labels if lab})})")
        return labels.index(component)
    k = int(component)
    if not 0 <= k < model.model_config.n_components:
        raise AtlasDGDError(f"component must be in 0..{model.model_config.n_components - 1}, got {k}")
    return k


def sample_cells(model, n: int, component, covariates: dict[str, str], library: dict[str, float], seed: int) -> dict[str, ad.AnnData]:
    if n < 1:
        raise AtlasDGDError(f"n must be >= 1, got {n}")
    # drawn on the host with a CPU generator: the same seed gives the same cells on every device
    module = copy.deepcopy(model.module).cpu()
    g = torch.Generator().manual_seed(seed)
    k = _component_index(model, component)
    basal = module.basal.sample(n, k, generator=g)
    blocks = [basal]
    obs = pd.DataFrame(index=[f"sample_{i:06d}" for i in range(n)])
    for key, gmm in module.covariate_gmms.items():
        classes = model.vocab.covariates[key]
        name = covariates.get(key, classes[0])
        if name not in classes:
            raise AtlasDGDError(f"{key!r} has no class {name!r} (classes: {classes})")
        blocks.append(gmm.means.detach()[classes.index(name)].expand(n, -1))
        obs[key] = name
    z = torch.cat(blocks, 1)
    with torch.no_grad():
        obs["dgd_cluster"] = module.basal.cluster(basal).numpy()
        log_y = module.log_fractions(z)
    rng = np.random.default_rng(seed)
    out = {}
    for m, features in model.vocab.features.items():
        s = library.get(m)
        if s is None:
            if model.library_model is None:
                raise AtlasDGDError(f"give a library size for {m!r} (the model has no training library statistics)")
            s = float(np.exp(model.library_model.median_log[m]))
        mu = torch.exp(log_y[m]).numpy() * s
        r = module.dispersion(m).detach().numpy()
        counts = rng.poisson(rng.gamma(shape=r, scale=mu / r)).astype(np.float32)
        out[m] = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs.copy(), var=pd.DataFrame(index=features),
                            obsm={"X_dgd": basal.numpy()}, layers={"dgd_mean": mu.astype(np.float32)})
    return out
