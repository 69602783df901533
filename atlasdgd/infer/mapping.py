"""Mapping new cells: representations for a query under a frozen decoder and mixtures.

Candidate search (:mod:`atlasdgd.infer.candidates`) picks each cell's start; representation-only
Adam refines it (spec section 2.1). The optional two-step variant refines the best few candidates
of every cell for a few epochs each and keeps the one that ends lowest, at the cost of that many
extra short fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from atlasdgd.infer.candidates import DEFAULT_MEMORY_BUDGET, candidate_search, chunk_cells
from atlasdgd.model.module import DGDModule
from atlasdgd.infer.fit import fit_representations
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.runtime.device import module_device, to_numpy

log = logging.getLogger(__name__)


SHARED_BATCH_SIZE = 128  # cells per step where shared parameters learn (new covariate classes), as in training
MAX_FIT_BATCH = 1024  # larger batches gained little more (10k cells: 1.4 s per epoch at 512, 1.2 at 1,024)


@dataclass
class MappingOptions:
    """How new cells are mapped (defaults follow the spec)."""

    epochs: int = 20  # representation-only refinement epochs (100 recommended for large queries)
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes for one chunk of the candidate search
    # refine each cell's m best candidates for two_step_epochs and keep the best (0: off). Default 3:
    # Kang, one donor held out, label transfer 0.967 -> 0.990 and a lower loss; the search alone
    # sometimes starts a border cell in the wrong component and refinement never leaves it
    two_step: int = 3
    two_step_epochs: int = 5
    # cells per step. None: the representation fits take as many as half the memory budget allows
    # (128-1024; each cell's representation is fitted on its own under the frozen model, so this
    # changes speed, not the result: 10k cells, 2,000 genes, 2.2 -> 1.4 s per epoch at 512, measured),
    # and learning new covariate classes (shared parameters) takes SHARED_BATCH_SIZE
    batch_size: int | None = None
    lr: float = 1e-2
    betas: tuple[float, float] = (0.5, 0.7)
    seed: int = 0  # order of the shared steps when new covariate classes are learned (fits read in order)

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None: sized from memory_budget), got {self.batch_size}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.two_step == 1 or self.two_step < 0:
            raise ValueError(f"two_step must be 0 (off) or >= 2 candidates, got {self.two_step}")


    def fit_batch_size(self, module: DGDModule) -> int:
        """Cells per step of the representation fits: ``batch_size``, or sized from ``memory_budget``
        (half of it: the fits keep autograd's buffers, which the candidate search's sizing leaves out)."""
        if self.batch_size is not None:
            return self.batch_size
        return int(min(MAX_FIT_BATCH, max(SHARED_BATCH_SIZE, chunk_cells(module, self.memory_budget) // 2)))


@dataclass
class Mapping:
    values: np.ndarray  # [N, D] full representations
    loss: np.ndarray  # [N] final per-cell loss (reconstruction + priors)
    recon_per_feature: np.ndarray  # [N] reconstruction NLL per measured feature
    search_loss: np.ndarray  # [N] loss at the chosen candidate, before refinement
    curve: list[float]  # refinement: reconstruction NLL per feature per epoch


@torch.no_grad()
def cell_losses(module: DGDModule, loader, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell total loss and reconstruction NLL per measured feature at ``values``."""
    n = values.shape[0]
    total, recon, n_feat = np.zeros(n), np.zeros(n), np.zeros(n)
    for batch in loader:
        terms = module.losses(batch, values[batch.index])
        idx = to_numpy(batch.index)
        total[idx] = to_numpy(terms.per_cell())
        recon[idx] = to_numpy(terms.reconstruction_total())
        for m, x in batch.counts.items():
            observed = np.ones(len(idx)) if batch.observed is None else to_numpy(batch.observed[m])
            n_feat[idx] += observed * x.shape[1]
    return total, recon / np.maximum(n_feat, 1)


def map_cells(module: DGDModule, data, options: MappingOptions | None = None, rows: np.ndarray | None = None,
              progress: bool = False, start: np.ndarray | None = None,
              basal_candidates: torch.Tensor | None = None) -> Mapping:
    """Representations for ``rows`` of ``data`` (a :class:`~atlasdgd.infer.query.Query` or
    :class:`~atlasdgd.data.cells.CellData`) with ``module`` frozen.

    ``start`` (``[len(rows), D]``) replaces the candidate search (for example an encoder's output).
    """
    opt = options or MappingOptions()
    module.eval()
    rows = np.arange(data.n_cells) if rows is None else np.asarray(rows)
    if len(rows) > 1 and np.any(np.diff(rows) < 0):  # the loader works on sorted rows: map those, then undo
        order = np.argsort(rows, kind="stable")
        mapped = map_cells(module, data, opt, rows[order], progress, None if start is None else np.asarray(start)[order],
                           basal_candidates)
        back = np.argsort(order)
        return Mapping(mapped.values[back], mapped.loss[back], mapped.recon_per_feature[back],
                       mapped.search_loss[back], mapped.curve)
    n = len(rows)
    device = module_device(module)  # search and refinement run where the module lives

    def loader(batch_size: int):
        return data.loader(rows, batch_size, shuffle=False, device=device)

    # each row steps on its own cell's gradient, so which cells share a batch changes nothing: the fits
    # read in order, like the evaluations (contiguous reads, one chunk held at a time instead of a
    # shuffling window: the held-out phase's peak at 200k cells, measured)
    cells = loader(opt.fit_batch_size(module))
    if start is not None:
        start = torch.as_tensor(start, dtype=torch.float32).to(device)
        search_loss = torch.from_numpy(cell_losses(module, cells, start)[0])[:, None]
    else:
        keep = max(1, opt.two_step)
        log.info("mapping: candidate search for %d cells", n)
        starts, search_loss = candidate_search(module, loader(chunk_cells(module, opt.memory_budget)), n, keep,
                                               progress=progress, basal_candidates=basal_candidates)
        found = torch.isfinite(search_loss).all(0)  # fewer candidates than ``keep`` exist: drop the empty slots
        found[0] = True
        starts, search_loss = starts[:, found], search_loss[:, found]
        keep = starts.shape[1]
        start = starts[:, 0] if keep == 1 else _two_step(module, starts, cells, opt, progress)
    table = RepresentationTable(start, opt.lr, opt.betas, device=device)
    log.info("mapping: refining %d representations for %d epochs", n, opt.epochs)
    curve = fit_representations(module, cells, table, opt.epochs, progress=progress, desc="refining")
    loss, recon = cell_losses(module, cells, table.values)
    return Mapping(to_numpy(table.values), loss, recon, to_numpy(search_loss[:, 0]), curve)


def _two_step(module: DGDModule, starts: torch.Tensor, cells, opt: MappingOptions, progress: bool) -> torch.Tensor:
    """Refine each cell's shortlisted candidates briefly; the one that ends lowest per cell.

    Kept as a running best, one candidate's table at a time (stacking every candidate's end held
    two more [cells, candidates, D] copies at the held-out phase's peak)."""
    best, best_loss = None, None
    for j in range(starts.shape[1]):
        table = RepresentationTable(starts[:, j], opt.lr, opt.betas, device=module_device(module))
        fit_representations(module, cells, table, opt.two_step_epochs, progress=progress,
                            desc=f"two-step candidate {j + 1}/{starts.shape[1]}")
        table.release_optimizer_state()  # only the end positions are compared: moments were 2/3 of each table
        loss = torch.from_numpy(cell_losses(module, cells, table.values)[0])
        end = table.values.cpu()
        del table
        if best is None:
            best, best_loss = end, loss
            continue
        # strictly lower wins, so ties keep the earlier (better-searched) candidate; a finite loss beats NaN
        better = (loss < best_loss) | (torch.isnan(best_loss) & ~torch.isnan(loss))
        best[better] = end[better]
        best_loss = torch.where(better, loss, best_loss)
    return best
