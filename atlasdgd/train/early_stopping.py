"""Early stopping on the validation reconstruction loss that keeps the best state."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import torch

from atlasdgd.runtime.device import to_numpy


class Snapshot:
    """A best-so-far state: dense weights in memory (small), representation tables in a temporary file.

    Read like a dict: ``snapshot["module"]`` (parameter name -> tensor) and ``snapshot["train"]`` /
    ``snapshot["validation"]`` (a table's values, read back from disk onto the device they came
    from; None when there is no such table). Held in memory the tables were one more float32 copy
    of every cell's representation, 88 bytes per cell at 22 dimensions (issue 12: memory flat in
    the number of cells). The file is unnamed (in ``TMPDIR``) and disappears when the snapshot is
    closed, dropped, or the process dies. It is written once per improving epoch and read once, at
    the end (and when a checkpoint stores a new best).
    """

    def __init__(self, module_state: dict[str, torch.Tensor], tables: dict[str, torch.Tensor | None]):
        self.module_state = module_state
        self._file = tempfile.TemporaryFile(prefix="atlasdgd-best-")
        self._where: dict[str, tuple[int, torch.device] | None] = {}
        for name, values in tables.items():
            if values is None:
                self._where[name] = None
                continue
            self._where[name] = (self._file.tell(), values.device)
            np.save(self._file, to_numpy(values), allow_pickle=False)
        self._file.flush()

    def __getitem__(self, key: str):
        if key == "module":
            return self.module_state
        where = self._where[key]
        if where is None:
            return None
        offset, device = where
        self._file.seek(offset)
        return torch.from_numpy(np.load(self._file, allow_pickle=False)).to(device)

    def get(self, key: str, default=None):
        return self[key] if key == "module" or key in self._where else default

    def close(self) -> None:
        self._file.close()


class EarlyStopping:
    """Stop once ``patience`` epochs pass without improvement, never before ``min_epochs``.

    ``update`` returns True when the epoch is the new best; the caller then stores a snapshot
    (a :class:`Snapshot`) with :meth:`keep`, restored at the end (the reference keeps the last weights instead).
    """

    def __init__(self, min_epochs: int = 50, patience: int = 10, min_delta: float = 0.0):
        self.min_epochs, self.patience, self.min_delta = min_epochs, patience, min_delta
        self.best = math.inf
        self.best_epoch = -1
        self.snapshot: Snapshot | None = None

    def update(self, epoch: int, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def keep(self, state: Snapshot | None) -> None:
        """Take ``state`` as the snapshot; the one it replaces is closed (its file removed)."""
        if self.snapshot is not None and self.snapshot is not state:
            self.snapshot.close()
        self.snapshot = state

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.min_epochs and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        """The stopping state (the snapshot is saved apart: it is tensors)."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
