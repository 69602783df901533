"""Ray Train wiring: N torch workers (gloo on CPU, NCCL on GPUs), one DGD training function.

The training function is the single-process one (:meth:`atlasdgd.DGD.train`): Ray starts the
workers and the process group, each worker opens the store itself and trains the rows of its own
cells. Checkpoints go to the model URI (not Ray's storage), so a restarted worker group (Ray's
failure handling) and a re-run with ``--resume`` both continue from the latest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from atlasdgd.errors import AtlasDGDError, missing_extra
from atlasdgd.runtime.threads import worker_environment

log = logging.getLogger(__name__)


def _worker(config: dict) -> None:
    """Runs in every Ray worker."""
    import torch

    import atlasdgd
    from atlasdgd.runtime import sync

    torch.set_num_threads(config["threads"])
    # each worker opens the store itself (TileDB-SOMA handles cannot cross processes); with GPUs,
    # Ray Train's device helper gives each worker its own
    device = "cpu"
    if config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    model = atlasdgd.DGD(config["store"], storage_options=config["storage_options"], device=device, **config["model"])
    # after the first attempt a restarted group always resumes from the model URI's checkpoints;
    # every worker reads the marker before any writes it, so all decide alike
    resume = config["resume"] or _attempt_marker(config, read=True)
    sync.barrier()
    _attempt_marker(config, read=False)
    from atlasdgd.train.metrics_log import TensorBoardLog, chain, report_to_ray

    board = TensorBoardLog(config["tensorboard"]) if config.get("tensorboard") and sync.rank() == 0 else None
    model.train(progress=config["progress"] and sync.rank() == 0, checkpoint_uri=config["out"],
                storage_options=config["storage_options"], resume=resume, checkpoint_every=config["checkpoint_every"],
                checkpoint_seconds=config["checkpoint_seconds"], on_epoch=chain(report_to_ray, board), **config["train"])
    if board is not None:
        board.close()
    if sync.rank() == 0:
        model.save(config["out"], overwrite=True, storage_options=config["storage_options"])


def _attempt_marker(config: dict, read: bool) -> bool:
    """A file in the model URI that says a previous attempt of this run already started."""
    from atlasdgd.runtime import sync
    from atlasdgd.io.uri import filesystem

    fs, root = filesystem(config["out"], config["storage_options"])
    path = f"{root.rstrip('/')}/checkpoints/.run-{config['run_id']}"
    if read:
        return fs.exists(path)
    if sync.rank() == 0:
        fs.makedirs(f"{root.rstrip('/')}/checkpoints", exist_ok=True)
        fs.pipe_file(path, b"started")
    return True


def train_on_ray(store: str, out: str, *, workers: int, address: str | None = None, storage_options: dict | None = None,
                 model_options: dict | None = None, train_options: dict | None = None, resume: bool = False,
                 checkpoint_every: int | None = None, checkpoint_seconds: float = 300.0, threads: int | None = None,
                 overwrite: bool = False, use_gpu: bool = False, tensorboard: str | None = None,
                 max_failures: int = 3, progress: bool = True) -> pd.DataFrame:
    """Train on ``workers`` Ray workers; writes the model to ``out``; returns the history. Each epoch's
    metrics go to ``ray.train.report`` (Ray's dashboard) and, with ``tensorboard``, to that folder."""
    try:
        import ray
        import ray.train.torch  # noqa: F401  (Ray Train, not just Ray core)
    except ImportError as e:
        raise missing_extra("training on several workers", "Ray Train", "ray") from e
    if workers < 1:
        raise AtlasDGDError(f"workers must be >= 1, got {workers}")
    connected = _connect(ray, address or os.environ.get("RAY_ADDRESS"), workers, progress)
    try:
        return _fit(store, out, workers=workers, storage_options=storage_options, model_options=model_options,
                    train_options=train_options, resume=resume, checkpoint_every=checkpoint_every,
                    checkpoint_seconds=checkpoint_seconds, threads=threads, use_gpu=use_gpu,
                    max_failures=max_failures, progress=progress, tensorboard=tensorboard)
    finally:
        if connected:  # leave Ray as we found it: a cluster we joined keeps running, one we started stops
            ray.shutdown()


def _connect(ray, address: str | None, workers: int, progress: bool) -> bool:
    """Join ``address``, else a Ray cluster already running on this machine, else start one for this
    run; returns whether this call connected (and so must disconnect). Starting a second cluster
    beside a running one (what ``ray.init(num_cpus=...)`` did) failed with Ray's traceback."""
    if ray.is_initialized():  # the caller's session: use it as it is
        return False
    # workers share cores: OpenMP must not spin-wait (15x slower epochs measured here otherwise)
    runtime_env = {"env_vars": worker_environment()}
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=progress, runtime_env=runtime_env)
        except ConnectionError as e:
            raise AtlasDGDError(f"no Ray cluster answers at {address!r} ({e}): start it (ray start --head) or drop "
                                "--address to run a local one") from e
        log.info("joined the Ray cluster at %s", address)
        return True
    try:
        ray.init(address="auto", include_dashboard=False, log_to_driver=progress, runtime_env=runtime_env)
        log.info("joined the Ray cluster running on this machine")
    except ConnectionError:  # none running: a local one for this run
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=progress,
                 runtime_env=runtime_env)
        log.info("started a local Ray cluster for this run")
    return True


def _fit(store: str, out: str, *, workers: int, storage_options, model_options, train_options, resume,
         checkpoint_every, checkpoint_seconds, threads, use_gpu, max_failures, progress,
         tensorboard=None) -> pd.DataFrame:
    """One TorchTrainer run on the connected cluster; the history the workers wrote."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cpus = int(ray.cluster_resources().get("CPU", workers))
    threads = threads or max(1, cpus // workers)
    def absolute(uri: str) -> str:  # workers do not share the driver's working directory
        return uri if "://" in str(uri) else str(Path(uri).resolve())

    config = {
        "store": absolute(store), "out": absolute(out), "storage_options": storage_options, "model": dict(model_options or {}),
        "train": dict(train_options or {}), "resume": resume, "checkpoint_every": checkpoint_every,
        "checkpoint_seconds": checkpoint_seconds,
        "threads": threads, "progress": progress, "use_gpu": use_gpu,
        "tensorboard": None if tensorboard is None else str(Path(tensorboard).resolve()), "run_id": f"{int(time.time() * 1000)}-{os.getpid()}",
    }
    # Ray's own run storage (not our checkpoints): a local scratch folder
    storage = (Path(out).resolve().parent if "://" not in str(out) else Path.cwd()) / f".{Path(str(out)).name}.ray"
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="atlasdgd", storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise AtlasDGDError(f"distributed training failed: {result.error}")
    import shutil

    shutil.rmtree(storage, ignore_errors=True)
    from atlasdgd.artifact import HISTORY
    from atlasdgd.io.uri import filesystem

    fs, root = filesystem(config["out"], storage_options)
    with fs.open(f"{root.rstrip('/')}/{HISTORY}") as f:
        return pd.read_csv(f)
