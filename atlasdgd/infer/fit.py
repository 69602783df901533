"""Representation-only fitting: decoder and mixtures frozen, only the cells' rows move.

Used for new cells (mapping), for validation cells during training and for held-out test cells.
"""

from __future__ import annotations

import torch

from atlasdgd.model.module import Batch, DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.runtime.sync import all_reduce_sum


class EpochStats:
    """Running sums over an epoch, reported per cell and per feature.

    Sums stay on the batches' device until read (one host sync per epoch, not several per step).
    """

    def __init__(self, n_features: dict[str, int]):
        self.n_features = n_features
        self.cells = 0
        self.objective = 0.0
        self.recon = {m: 0.0 for m in n_features}
        self.recon_cells = {m: 0 for m in n_features}
        self._pending: dict[str, torch.Tensor] = {}

    def add(self, batch: Batch, terms, objective_sum) -> None:
        self.cells += len(batch)
        sums = {"objective": torch.as_tensor(objective_sum).detach().double()}
        for m, v in terms.reconstruction.items():
            total = v.detach().sum()
            if m in terms.reconstruction_batch:
                total = total + terms.reconstruction_batch[m].detach()
            sums[f"recon.{m}"] = total.double()
            if batch.observed is not None:
                sums[f"cells.{m}"] = batch.observed[m].sum().double()
            else:
                self.recon_cells[m] += len(batch)
        for key, value in sums.items():
            self._pending[key] = value if key not in self._pending else self._pending[key] + value

    def _settle(self) -> None:
        """Move the pending device sums into the float totals."""
        if not self._pending:
            return
        keys = list(self._pending)
        values = torch.stack([self._pending[k].reshape(()).cpu() for k in keys]).tolist()
        self._pending = {}
        for key, value in zip(keys, values):
            if key == "objective":
                self.objective += value
            elif key.startswith("recon."):
                self.recon[key[6:]] += value
            else:
                self.recon_cells[key[6:]] += int(value)

    def recon_per_feature(self, m: str) -> float:
        self._settle()
        return self.recon[m] / max(1, self.recon_cells[m] * self.n_features[m])

    def all_reduce(self) -> "EpochStats":
        """Sum the statistics over data-parallel workers (a no-op in one process)."""
        self._settle()
        keys = list(self.recon)
        values = all_reduce_sum([self.cells, self.objective] + [self.recon[m] for m in keys]
                                + [self.recon_cells[m] for m in keys])
        self.cells, self.objective = int(values[0]), values[1]
        for i, m in enumerate(keys):
            self.recon[m] = values[2 + i]
            self.recon_cells[m] = int(values[2 + len(keys) + i])
        return self

    def summary(self, prefix: str) -> dict[str, float]:
        self._settle()
        out = {f"{prefix}_loss": self.objective / max(1, self.cells)}
        total_nll = sum(self.recon.values())
        total_entries = sum(self.recon_cells[m] * self.n_features[m] for m in self.recon)
        out[f"{prefix}_recon"] = total_nll / max(1, total_entries)
        for m in self.recon:
            out[f"{prefix}_recon_{m}"] = self.recon_per_feature(m)
        return out


def representation_step(
    module: DGDModule, batch: Batch, table: RepresentationTable, steps: int = 1, batch_mean: bool = False
):
    """Optimise only the rows of ``batch`` (decoder and mixtures frozen); returns the first loss terms.

    Each row steps on the gradient of its own cell's loss, so its step does not depend on which
    cells share its batch: fits of new cells give the same result at any batch size (with the
    batch mean's gradient Adam's eps made them differ by up to 1e-2, measured). ``batch_mean``: the
    gradient of the batch mean instead, for rows whose Adam moments hold training-step gradients
    (which are of the batch mean) and for validation rows (as they always were)."""
    first = None
    for _ in range(steps):
        z = table.gather(batch.index)
        terms = module.losses(batch, z)
        loss = terms.per_cell().sum()
        (grad,) = torch.autograd.grad(loss / len(batch) if batch_mean else loss, z)
        table.step(batch.index, grad)
        if first is None:
            first = terms
    return first


def fit_representations(
    module: DGDModule,
    loader,
    table: RepresentationTable,
    epochs: int,
    steps: int = 1,
    progress: bool = False,
    desc: str = "fitting representations",
) -> list[float]:
    """Representation-only epochs (decoder and mixtures frozen); returns reconstruction NLL per feature per epoch."""
    from tqdm.auto import tqdm

    n_features = dict(module.config.modalities)
    curve = []
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        stats = EpochStats(n_features)
        for batch in loader:
            stats.add(batch, representation_step(module, batch, table, steps), 0.0)
        curve.append(stats.summary("fit")["fit_recon"])
    return curve
