"""Per-epoch training metrics for dashboards: TensorBoard (when installed) and Ray's (on Ray workers).

The model directory's ``history.csv`` always has every epoch; these callbacks show them while the run
goes on. Each is an ``on_epoch`` callback of :meth:`atlasdgd.DGD.train`.
"""

from __future__ import annotations

import logging
import math

from atlasdgd.errors import missing_extra

log = logging.getLogger(__name__)


def _scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a history row (no epoch/flags/clock), as floats."""
    out = {}
    for k, v in row.items():
        if k in ("epoch", "best", "wall_time") or isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class TensorBoardLog:
    """Writes each epoch's losses (and component sizes) as TensorBoard scalars under ``directory``."""

    def __init__(self, directory: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise missing_extra("--tensorboard", "tensorboard", "tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(directory))

    def __call__(self, row: dict) -> None:
        for key, value in _scalars(row).items():
            group = "components" if key.startswith("component_") else "loss" if "recon" in key or "loss" in key else "run"
            self.writer.add_scalar(f"{group}/{key}", value, int(row["epoch"]), walltime=row.get("wall_time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def report_to_ray(row: dict) -> None:
    """``ray.train.report`` of the epoch's metrics, so Ray's dashboard and ``Result.metrics`` follow the
    run (every worker calls it once per epoch, as Ray Train expects)."""
    import ray.train

    metrics = {k: v for k, v in _scalars(row).items() if not k.startswith("component_")}
    ray.train.report({"epoch": int(row["epoch"]), **metrics})


def chain(*callbacks):
    """One on_epoch callback calling each of ``callbacks`` (Nones skipped) in order."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None

    def call(row: dict) -> None:
        for c in active:
            c(row)

    return call
