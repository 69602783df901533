"""Per-cell representation tables with a row-local Adam.

The reference DGD steps all representations once per epoch with gradients accumulated over the
epoch. Each row receives gradient from exactly one minibatch per epoch, so an Adam step applied to
just that minibatch's rows right after it, with per-row moments and a per-row step count, is the
same update. Because nothing here is shared between rows, each distributed worker can own the
rows of its own cells and never communicate them.
"""

from __future__ import annotations

import torch


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
        """One Adam step on rows ``index`` (unique) with gradient ``grad`` ``[len(index), D]``.

        Mirrors ``torch.optim.Adam`` (no weight decay) arithmetic, with the step count per row.
        """
        beta1, beta2 = self.betas
        t = self.steps[index] + 1
        self.steps[index] = t
        m = self.exp_avg[index].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[index].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        tf = t.to(self.values.dtype)[:, None]
        bias1 = 1 - beta1**tf
        bias2 = 1 - beta2**tf
        denom = (v.sqrt() / bias2.sqrt()).add_(self.eps)
        self.values[index] -= (self.lr / bias1) * m / denom
        self.exp_avg[index] = m
        self.exp_avg_sq[index] = v

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
