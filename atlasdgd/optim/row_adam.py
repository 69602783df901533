"""Per-cell representation tables with a row-local Adam.

The reference DGD steps all representations once per epoch with gradients accumulated over the
epoch. Each row receives gradient from exactly one minibatch per epoch, so an Adam step applied to
just that minibatch's rows right after it, with per-row moments and a per-row step count, is the
same update. Because nothing here is shared between rows, each distributed worker can own the
rows of its own cells and never communicate them.
"""

from __future__ import annotations

import torch


def adam_rows(values: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
              grad: torch.Tensor, lr: float, betas: tuple[float, float], eps: float):
    """One Adam step of some rows, given their values, moments and step counts: the new four.

    ``torch.optim.Adam``'s arithmetic (no weight decay) with a step count per row; pure, so the eager
    table and the compiled training step (:mod:`atlasdgd.train.compiled_step`) share it."""
    beta1, beta2 = betas
    t = steps + 1
    m = exp_avg * beta1 + grad * (1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    tf = t.to(values.dtype)[:, None]
    denom = v.sqrt() / (1 - beta2**tf).sqrt() + eps
    return values - (lr / (1 - beta1**tf)) * m / denom, m, v, t


class RepresentationTable:
    """An ``N x D`` table of trainable per-cell vectors and their Adam state."""

    def __init__(
        self,
        values: torch.Tensor,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.5, 0.7),
        eps: float = 1e-8,
        device: torch.device | str | None = None,
    ):
        if values.ndim != 2:
            raise ValueError(f"a representation table is 2-D (cells x dims), got shape {tuple(values.shape)}")
        device = values.device if device is None else torch.device(device)
        self.values = values.detach().to(device=device, dtype=torch.float32, copy=True).contiguous()
        self.exp_avg = torch.zeros_like(self.values)
        self.exp_avg_sq = torch.zeros_like(self.values)
        self.steps = torch.zeros(self.values.shape[0], dtype=torch.int64, device=device)
        self.lr, self.betas, self.eps = lr, betas, eps

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` as a fresh leaf tensor that collects their gradient."""
        return self.values[index].clone().requires_grad_(True)

    @torch.no_grad()
    def step(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step on rows ``index`` (unique) with gradient ``grad`` ``[len(index), D]``."""
        new = adam_rows(self.values[index], self.exp_avg[index], self.exp_avg_sq[index], self.steps[index], grad,
                        self.lr, self.betas, self.eps)
        for table, rows in zip((self.values, self.exp_avg, self.exp_avg_sq, self.steps), new):
            table[index] = rows

    def release_optimizer_state(self) -> None:
        """Drop the Adam moments and step counts (two thirds of the table's memory) once no step
        follows; the values stay."""
        empty = self.values.new_zeros((0, self.dim))
        self.exp_avg, self.exp_avg_sq = empty, empty
        self.steps = self.steps.new_zeros(0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("values", "exp_avg", "exp_avg_sq", "steps"):
            if state[key].shape[0] != len(self):
                raise ValueError(f"table state {key!r} has {state[key].shape[0]} rows, the table has {len(self)}")
        device = self.device
        self.values = state["values"].to(device, copy=True)
        self.exp_avg = state["exp_avg"].to(device, copy=True)
        self.exp_avg_sq = state["exp_avg_sq"].to(device, copy=True)
        self.steps = state["steps"].to(device, copy=True)
