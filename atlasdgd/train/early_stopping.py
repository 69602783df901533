"""Early stopping on the validation reconstruction loss that keeps the best state."""

from __future__ import annotations

import math


class EarlyStopping:
    """Stop once ``patience`` epochs pass without improvement, never before ``min_epochs``.

    ``update`` returns True when the epoch is the new best; the caller then stores a snapshot
    (a fresh copy) with :meth:`keep`, restored at the end (the reference keeps the last weights instead).
    """

    def __init__(self, min_epochs: int = 50, patience: int = 10, min_delta: float = 0.0):
        self.min_epochs, self.patience, self.min_delta = min_epochs, patience, min_delta
        self.best = math.inf
        self.best_epoch = -1
        self.snapshot = None

    def update(self, epoch: int, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def keep(self, state) -> None:
        self.snapshot = state

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.min_epochs and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        """The stopping state (the snapshot is saved apart: it is tensors)."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
