"""Early stopping on the validation reconstruction loss that keeps the best state."""

from __future__ import annotations

import logging
import math
import tempfile

import numpy as np
import torch

from atlasdgd.runtime.device import to_numpy

log = logging.getLogger(__name__)


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
        # table name -> (offset, device) in the file; a tensor when the file cannot be written; None: no table
        self._where: dict[str, tuple[int, torch.device] | torch.Tensor | None] = dict.fromkeys(tables)
        self._file = None
        try:
            self._file = tempfile.TemporaryFile(prefix="atlasdgd-best-")
            for name, values in tables.items():
                if values is not None:
                    self._where[name] = (self._file.tell(), values.device)
                    np.save(self._file, to_numpy(values), allow_pickle=False)
            self._file.flush()
        except OSError as e:  # a full or read-only TMPDIR costs memory, not the training run
            log.warning("early stopping keeps its snapshot in memory: cannot write it to %s (%s); set TMPDIR to "
                        "a writable disk to save that memory", tempfile.gettempdir(), e)
            if self._file is not None:
                self._file.close()
                self._file = None
            self._where = {name: None if values is None else values.detach().clone() for name, values in tables.items()}

    def __getitem__(self, key: str):
        if key == "module":
            return self.module_state
        where = self._where[key]
        if where is None or isinstance(where, torch.Tensor):
            return None if where is None else where.clone()
        offset, device = where
        self._file.seek(offset)
        return torch.from_numpy(np.load(self._file, allow_pickle=False)).to(device)

    def get(self, key: str, default=None):
        return self[key] if key == "module" or key in self._where else default

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._where = {}  # a closed snapshot has nothing to give


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
