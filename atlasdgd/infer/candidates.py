"""Starting points for new representations: the best mixture component mean per cell.

Fitting a new cell's representation by gradient steps alone lets the (by then very tight) mixture
prior capture it at whichever component is nearest its starting point. Instead each cell starts at
the candidate with the lowest loss (reconstruction + prior), then refines. Candidates are scored one
at a time for a minibatch, without autograd, so memory is one minibatch of decoded features no
matter how many cells or candidates there are (the reference builds a cells x candidates x features
tensor at once).
"""

from __future__ import annotations

import torch

from atlasdgd.model.module import DGDModule


@torch.no_grad()
def candidate_search(module: DGDModule, loader, n_cells: int) -> torch.Tensor:
    """``[n_cells, D]`` start representations: for each cell the basal component mean (with the
    covariate blocks at the means of the cell's known classes) that minimises its loss."""
    was_training = module.training
    module.eval()
    cfg = module.config
    out = torch.zeros(n_cells, cfg.representation_dim)
    means = module.basal.means.detach()
    for batch in loader:
        b = len(batch)
        cov_blocks = [gmm.means.detach()[batch.covariates[:, q]] for q, gmm in enumerate(module.covariate_gmms.values())]
        best_loss = torch.full((b,), float("inf"))
        best = torch.zeros(b, cfg.representation_dim)
        for k in range(cfg.n_components):
            z = torch.cat([means[k].expand(b, -1), *cov_blocks], dim=1)
            loss = module.losses(batch, z).per_cell()
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best[better] = z[better]
        out[batch.index] = best
    module.train(was_training)
    return out
