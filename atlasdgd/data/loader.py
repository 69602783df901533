"""In-memory minibatch loader over CellData rows.

Yields :class:`~atlasdgd.model.module.Batch` objects whose ``index`` is the position of each cell
within ``rows``, i.e. its row in the representation table of that split. The order is a pure
function of (seed, epoch), so runs are reproducible; with a ``plan``
(:class:`~atlasdgd.store.loader.BlockShufflePlan`) it is exactly the streaming loader's order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from atlasdgd.data.cells import CellData
from atlasdgd.model.module import Batch


class InMemoryLoader:
    def __init__(
        self,
        data: CellData,
        rows: np.ndarray,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        plan=None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.rows = data, np.asarray(rows, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0
        self.plan = plan  # optional: batches from a BlockShufflePlan (the streaming loader's order)
        self._library = {m: data.library(m) for m in data.modalities}
        self._covariates = data.covariate_codes()
        self._observed = {m: data.observed[m] for m in data.modalities}
        self._all_observed = all(o[self.rows].all() for o in self._observed.values())
        # query data measuring only some of the model's features (see atlasdgd.infer.query)
        features = getattr(data, "features", None) or {}
        self._features = {
            m: torch.from_numpy(np.asarray(idx, dtype=np.int64))
            for m, idx in features.items()
            if not data.complete_features(m)
        } or None

    def __len__(self) -> int:
        return self.plan.n_steps if self.plan is not None else -(-len(self.rows) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """Table positions in this epoch's order."""
        pos = np.arange(len(self.rows))
        if self.shuffle:
            pos = np.random.default_rng([self.seed, self.epoch]).permutation(pos)
        return pos

    def batch(self, positions: np.ndarray) -> Batch:
        positions = np.sort(positions)  # sorted rows read CSR memory in order
        cells = self.rows[positions]
        counts = {m: torch.from_numpy(x[cells].toarray()) for m, x in self.data.counts.items()}
        library = {m: torch.from_numpy(lib[cells]) for m, lib in self._library.items()}
        observed = None if self._all_observed else {m: torch.from_numpy(o[cells]) for m, o in self._observed.items()}
        return Batch(
            index=torch.from_numpy(positions),
            counts=counts,
            library=library,
            covariates=torch.from_numpy(self._covariates[cells]),
            observed=observed,
            features=self._features,
        )

    def __iter__(self) -> Iterator[Batch]:
        if self.plan is not None:
            for positions in self.plan.batches(self.epoch):
                yield self.batch(positions)
            return
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start : start + self.batch_size])
