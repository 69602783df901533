"""Starting points for new representations: the best combination of mixture component means.

Fitting a new cell's representation by gradient steps alone lets the (by then very tight) mixture
prior capture it at whichever component is nearest its starting point. Instead each cell starts at
the candidate with the lowest loss (reconstruction + prior): a basal component mean joined with a
covariate component mean per covariate (the cell's own class where it is known, every class where
it is not). Candidates are scored one at a time for a chunk of cells, without autograd, so memory is
one chunk of decoded features however many cells and candidates there are (the reference builds a
cells x candidates x features tensor at once); :func:`chunk_cells` sizes the chunk for a budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from atlasdgd.model.decoder import head_width
from atlasdgd.model.module import Batch, DGDModule

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes


def bytes_per_cell(module: DGDModule) -> int:
    """Working memory of scoring one candidate for one cell (float32), with head-room.

    Per feature: the dense counts, the head's logits, log-softmax, log mu, log(mu + r) and the
    element-wise products of the likelihood, plus allocator slack: 16 values, measured at ~13 in
    ``tests/test_mapping.py``; per hidden unit a few activations.
    """
    cfg = module.config
    features = sum(cfg.modalities.values())
    hidden = sum(cfg.hidden) * 4 + sum(head_width(f) for f in cfg.modalities.values()) * 2
    return 4 * (16 * features + 2 * hidden + 4 * cfg.representation_dim)


def chunk_cells(module: DGDModule, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Cells per chunk so that scoring a chunk stays within ``memory_budget`` bytes."""
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    return max(1, int(memory_budget // bytes_per_cell(module)))


def _candidate_codes(module: DGDModule, covariates: torch.Tensor,
                     n_basal: int) -> Iterator[tuple[int, tuple[int | None, ...]]]:
    """(basal candidate, covariate class per covariate) combinations to score for a chunk.

    A covariate known for every cell of the chunk is not searched (None = use the cell's own class).
    """
    options = []
    for q, gmm in enumerate(module.covariate_gmms.values()):
        all_known = covariates.shape[0] == 0 or bool((covariates[:, q] >= 0).all())
        options.append([None] if all_known else list(range(gmm.n_components)))
    for k in range(n_basal):
        for combo in itertools.product(*options):
            yield k, combo


def _candidate(module: DGDModule, batch: Batch, basal: torch.Tensor, combo: tuple[int | None, ...]) -> torch.Tensor:
    b = len(batch)
    blocks = [basal.expand(b, -1)]
    for q, (gmm, c) in enumerate(zip(module.covariate_gmms.values(), combo)):
        own = batch.covariates[:, q]
        if c is None:
            blocks.append(gmm.means[own])
        else:
            blocks.append(torch.where((own >= 0)[:, None], gmm.means[own.clamp_min(0)], gmm.means[c].expand(b, -1)))
    return torch.cat(blocks, dim=1)


@torch.no_grad()
def candidate_search(
    module: DGDModule,
    batches: Iterable[Batch],
    n_cells: int,
    keep: int = 1,
    progress: bool = False,
    basal_candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidates per cell: ``([n_cells, keep, D] starts, [n_cells, keep] losses)``, best first.

    ``batches`` are chunks of cells (their ``index`` = row in the output); see :func:`chunk_cells`.
    ``basal_candidates`` ``[C, L]``: basal positions to try (default: the component means).
    """
    from tqdm.auto import tqdm

    was_training = module.training
    module.eval()
    dim = module.config.representation_dim
    basal = module.basal.means.detach() if basal_candidates is None else basal_candidates
    starts = torch.zeros(n_cells, keep, dim)
    losses = torch.full((n_cells, keep), float("inf"))
    for batch in tqdm(batches, desc="candidate search", unit="chunk", disable=not progress, dynamic_ncols=True):
        b, device = len(batch), batch.index.device
        best_z = torch.zeros(b, keep, dim, device=device)
        best_loss = torch.full((b, keep), float("inf"), device=device)
        basal = basal.to(device)
        for k, combo in _candidate_codes(module, batch.covariates, len(basal)):
            z = _candidate(module, batch, basal[k], combo)
            loss = module.losses(batch, z).per_cell()
            # merge the new candidate into each cell's sorted shortlist
            all_loss = torch.cat([best_loss, loss[:, None]], dim=1)
            all_z = torch.cat([best_z, z[:, None, :]], dim=1)
            order = all_loss.argsort(dim=1)[:, :keep]
            best_loss = all_loss.gather(1, order)
            best_z = all_z.gather(1, order[:, :, None].expand(-1, -1, dim))
        index = batch.index.cpu()  # the shortlists of every cell stay on the host
        starts[index] = best_z.cpu()
        losses[index] = best_loss.cpu()
    module.train(was_training)
    return starts, losses

