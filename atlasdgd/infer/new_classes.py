"""Unseen covariate classes (a new batch, donor, ...) learned without touching the trained model.

Each unseen class of each covariate gets one new component in that covariate's mixture. It starts at
the mean of the covariate blocks its cells pick in the candidate search over the known classes, with
the average log-precision and the average weight of the known components. Then only the new
components' means and log-precisions and the new cells' representations are trained; every
existing parameter keeps its exact value (gradients of existing rows are masked, and Adam moves a
row with zero gradient by exactly zero). Mixture weights are not learned: a weight fitted only on
the new class's own cells would grow without bound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atlasdgd.infer.candidates import candidate_search, chunk_cells
from atlasdgd.infer.mapping import SHARED_BATCH_SIZE, MappingOptions
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.runtime.device import module_device


def extend_module(module: DGDModule, new_classes: dict[str, int]) -> DGDModule:
    """A copy of ``module`` whose covariate mixtures have ``new_classes[key]`` extra components.

    Existing parameters are copied bit for bit; new means start at the origin (set them before use).
    """
    config = ModelConfig.from_dict(module.config.to_dict())
    config.covariates = {k: n + new_classes.get(k, 0) for k, n in config.covariates.items()}
    device = module_device(module)
    extended = DGDModule(config).to(device)
    extended.autocast_dtype = module.autocast_dtype
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for key, n_new in new_classes.items():
        if n_new <= 0:
            continue
        prefix = f"covariate_gmms.{key}."
        old = module.covariate_gmms[key]
        state[prefix + "means"] = torch.cat([old.means.detach(), torch.zeros(n_new, old.dim, device=device)])
        mean_nu = old.log_precision.detach().mean(0, keepdim=True)
        state[prefix + "log_precision"] = torch.cat([old.log_precision.detach(), mean_nu.expand(n_new, -1)])
        # the average weight of the known classes: log(mean(softmax)) + logsumexp(logits)
        logits = old.logits.detach()
        new_logit = torch.logsumexp(logits, 0) - math.log(len(logits))
        state[prefix + "logits"] = torch.cat([logits, new_logit.expand(n_new)])
    extended.load_state_dict(state)
    extended.eval()
    return extended


def learn_new_classes(
    module: DGDModule,
    data,
    unseen: dict[str, list[str]],
    covariate_values: dict[str, np.ndarray],
    options: MappingOptions,
    hyperprior_weight: float = 1.0,
    progress: bool = False,
) -> tuple[DGDModule, np.ndarray]:
    """Add and fit one component per unseen class; returns the extended module and the updated codes.

    Args:
        data: the aligned query (:class:`~atlasdgd.infer.query.Query`); its unseen classes have code -1.
        unseen: covariate key -> unseen class names, in the order their components are appended.
        covariate_values: covariate key -> each cell's class name (str or None) from the query's obs.
    """
    from tqdm.auto import tqdm

    keys = list(module.config.covariates)
    extended = extend_module(module, {k: len(v) for k, v in unseen.items()})
    codes = data.covariates.copy()
    for key, names in unseen.items():
        q = keys.index(key)
        base = module.config.covariates[key]
        for j, name in enumerate(names):
            codes[covariate_values[key] == name, q] = base + j
    new_mask = np.zeros(data.n_cells, dtype=bool)
    for key in unseen:
        new_mask |= codes[:, keys.index(key)] >= module.config.covariates[key]
    rows = np.flatnonzero(new_mask)

    # start: candidate search over the known classes (codes still -1), new means from its choice
    device = module_device(module)
    search = data.loader(rows, chunk_cells(module, options.memory_budget), shuffle=False, device=device)
    starts, _ = candidate_search(module, search, len(rows), progress=progress)
    start = starts[:, 0].to(device)
    L, d = module.config.latent_dim, module.config.covariate_dim
    with torch.no_grad():
        for key, names in unseen.items():
            q = keys.index(key)
            gmm = extended.covariate_gmms[key]
            block = slice(L + q * d, L + (q + 1) * d)
            for j in range(len(names)):
                code = module.config.covariates[key] + j
                cells = torch.from_numpy(codes[rows, q] == code).to(device)
                gmm.means[code] = start[cells, block].mean(0)
                start[cells, block] = gmm.means[code]

    # train the new rows only
    data.covariates = codes
    params, hooks = [], []
    for p in extended.parameters():
        p.requires_grad_(False)
    for key in unseen:
        gmm = extended.covariate_gmms[key]
        n_old = module.config.covariates[key]
        for p in (gmm.means, gmm.log_precision):
            p.requires_grad_(True)
            mask = torch.zeros_like(p)
            mask[n_old:] = 1.0
            hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
            params.append(p)
    optimizer = torch.optim.Adam(params, lr=options.lr, betas=options.betas)
    table = RepresentationTable(start, options.lr, options.betas, device=device)
    loader = data.loader(rows, options.batch_size or SHARED_BATCH_SIZE, shuffle=True, seed=options.seed, device=device)
    for epoch in tqdm(range(options.epochs), desc="learning new classes", unit="epoch", disable=not progress,
                      dynamic_ncols=True):
        loader.set_epoch(epoch)
        for batch in loader:
            z = table.gather(batch.index)
            loss = extended.losses(batch, z).per_cell().mean()
            for key in unseen:
                loss = loss - hyperprior_weight * extended.covariate_gmms[key].hyperprior_log_prob()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            table.step(batch.index, z.grad)
    for h in hooks:
        h.remove()
    for p in extended.parameters():
        p.requires_grad_(True)
    extended.eval()
    return extended, codes


def learn_query_classes(module: DGDModule, covariates: dict[str, list[str]], aligned, options: MappingOptions,
                        hyperprior_weight: float = 1.0, progress: bool = False) -> DGDModule:
    """Learn one component per class of ``aligned.unseen_classes``; returns the extended module and
    appends the new class names to ``covariates`` (the model's vocabulary), in place."""
    import pandas as pd

    values = {k: np.array([None if pd.isna(v) else str(v) for v in aligned.obs[k]], dtype=object)
              for k in aligned.unseen_classes}
    extended, _ = learn_new_classes(module, aligned, aligned.unseen_classes, values, options,
                                    hyperprior_weight=hyperprior_weight, progress=progress)
    for key, names in aligned.unseen_classes.items():
        covariates[key] = list(covariates[key]) + list(names)
    aligned.unseen_classes = {}
    return extended
