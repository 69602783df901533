"""The cell-source interface: what training, mapping and the loader need from data, wherever it lives.

In-memory AnnData/MuData (:class:`~atlasdgd.data.cells.CellData`), atlas stores in zarr or
TileDB-SOMA (:class:`~atlasdgd.store.cells.StoreCells`) and query data lined up with a model
(:class:`~atlasdgd.infer.query.Query`) all implement it, so there is one loader
(:class:`~atlasdgd.data.loader.CellLoader`), one batch builder and one PCA start for all of them.
A source in memory is just one whose blocks are already in RAM: it says so with ``resident = True``
and hands its whole CSR matrices as ``counts`` (modality -> matrix), from which the loader copies each
batch's rows straight into the batch.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class CellSource(Protocol):
    """Cells (rows) with counts per modality; counts are read by row blocks, never all at once."""

    observed: dict[str, np.ndarray]  # modality -> [N] bool: was the cell measured there

    @property
    def n_cells(self) -> int: ...

    @property
    def modalities(self) -> list[str]: ...

    def n_features(self, modality: str) -> int: ...

    def library(self, modality: str) -> np.ndarray:
        """[N] float32 total counts per cell."""

    def covariate_codes(self) -> np.ndarray:
        """[N, Q] int64 class codes in the model's covariate order, -1 = unknown."""

    def read_rows(self, modality: str, rows: np.ndarray):
        """CSR counts (scipy or anything with indptr/indices/data) of sorted ``rows``."""


class LoadsBatches:
    """``loader()`` for every source: the one :class:`~atlasdgd.data.loader.CellLoader`."""

    def loader(self, rows: np.ndarray, batch_size: int = 128, shuffle: bool = True, seed: int = 0,
               rank: int = 0, world_size: int = 1, **options):
        """Minibatches of ``rows``; with several workers, worker ``rank``'s shard (see
        :mod:`atlasdgd.data.plan`). ``options``: ``chunk_cells``, ``buffer_chunks``, ``prefetch``, ``device``,
        ``count_summaries`` (see :class:`~atlasdgd.data.loader.CellLoader`)."""
        from atlasdgd.data.loader import CellLoader

        return CellLoader(self, rows, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                          **options)
