"""One training run over any cell source, on any device, as one worker of N (a process is a world of 1).

The steps: split rows -> start positions (one block-wise PCA for every source) and mixture start ->
this worker's shard (:class:`~atlasdgd.data.plan.WorkerShard`) -> representation tables on the
device -> :class:`~atlasdgd.train.trainer.Trainer` epochs with checkpoints -> held-out test cells
mapped as new cells -> every worker's rows assembled on worker 0 (through the model URI).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from atlasdgd.data.plan import WorkerShard
from atlasdgd.errors import AtlasDGDError
from atlasdgd.infer.library import LibraryModel
from atlasdgd.infer.mapping import MappingOptions, map_cells
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.runtime import sync
from atlasdgd.runtime.device import check_precision, resolve_device, to_numpy
from atlasdgd.runtime.malloc import release_free_memory
from atlasdgd.train.checkpoint import DEFAULT_CHECKPOINT_SECONDS
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.early_stopping import Snapshot
from atlasdgd.train.init import mixture_start, pca_start
from atlasdgd.train.trainer import Trainer

log = logging.getLogger(__name__)
# the held-out cells' candidate search in chunks of this many bytes: with mapping's 512 MiB default it
# raised training's peak by 300 MiB at 200k cells; at 64 MiB it stays under the PCA start's peak, and
# was no slower (40.9 vs 49.4 s for 20k test cells, measured)
HELDOUT_MEMORY_BUDGET = 64 * 2**20

SPLITS = ("train", "validation", "test")


@dataclass
class RunResult:
    history: list[dict]
    values: np.ndarray | None  # [N, D] every cell's representation on worker 0; None on the others
    library_model: LibraryModel | None


def initial_representations(module: DGDModule, source, cfg: TrainConfig, train_rows: np.ndarray) -> np.ndarray:
    """``[N, D]`` float32: basal part from the PCA start (or zeros), covariate parts at their class means."""
    mc = module.config
    values = np.zeros((source.n_cells, mc.representation_dim), dtype=np.float32)
    codes = source.covariate_codes()
    if cfg.init == "pca":
        groups = np.zeros(source.n_cells, dtype=np.int64)
        for q in range(codes.shape[1]):
            groups = groups * (codes[:, q].max() + 1) + codes[:, q]
        fit_mask = np.zeros(source.n_cells, dtype=bool)
        fit_mask[train_rows] = True
        pca_start(source, groups, mc.latent_dim, mc.radius, cfg.seed, fit_mask, out=values[:, : mc.latent_dim])
    for q, name in enumerate(mc.covariates):
        block = slice(mc.latent_dim + q * mc.covariate_dim, mc.latent_dim + (q + 1) * mc.covariate_dim)
        values[:, block] = to_numpy(module.covariate_gmms[name].means)[codes[:, q]]
    return values


def start_mixture(module: DGDModule, z: np.ndarray, label_codes: np.ndarray | None, n_labels: int,
                  cfg: TrainConfig) -> None:
    """Basal mixture means, variances and weights from a partition of the start positions ``z``
    (``label_codes``: the cells' label codes, -1 unlabelled; None without a label key)."""
    k = module.config.n_components
    method = cfg.gmm_init
    if method == "auto":
        # Leiden beat k-means as the unsupervised start (Kang, K = 4: ARI 0.974 vs 0.637)
        method = "labels" if label_codes is not None and n_labels == k else "leiden"
    means, variances, weights = mixture_start(z, k, method, label_codes, cfg.seed)
    if module.config.sigma0 is None:
        # the log-precision prior at the data's within-cluster scale, not at 0.2 R / K: with 15
        # components (SNARE-seq) 0.2 R / K is 7x tighter than the clusters and one component
        # swallows the others within five epochs
        sigma0 = float(np.sqrt((weights[:, None] * variances).sum(0).mean()))
        module.config.sigma0 = sigma0
        module.basal.set_sigma0(sigma0)
    basal = module.basal
    with torch.no_grad():
        basal.means.copy_(torch.from_numpy(means))
        basal.log_precision.copy_(-torch.log(torch.from_numpy(variances)))
        basal.logits.copy_(torch.log(torch.from_numpy(weights).clamp_min(1e-3)))


def run_training(module: DGDModule, source, cfg: TrainConfig, *, label_codes: np.ndarray | None = None,
                 n_labels: int = 0, device: torch.device | str | None = "cpu", checkpoint_uri: str | None = None,
                 storage_options: dict | None = None, resume: bool = False, checkpoint_every: int | None = None,
                 checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS, progress: bool = True, on_epoch=None,
                 start: np.ndarray | None = None) -> RunResult:
    """Train ``module`` on ``source`` (in place); see the module docstring.

    Checkpoints (with ``checkpoint_uri``) are written every ``checkpoint_every`` epochs, or when it is
    None once ``checkpoint_seconds`` of wall time have passed since the last.

    ``start`` ``[N, D]``: every cell's representation to continue from (fine-tuning a trained
    model); the PCA and mixture starts are skipped and the mixture keeps its trained state.

    Under torch.distributed (Ray Train workers) this is one worker's part: it trains the
    representation rows of its own cells only, and needs ``checkpoint_uri`` to assemble them.
    """
    from atlasdgd.train.checkpoint import CheckpointSchedule, Checkpoints, read_final_rows, write_final_rows

    rank, world = sync.rank(), sync.world_size()
    if world > 1 and checkpoint_uri is None:
        raise AtlasDGDError("several workers need a checkpoint_uri (the model URI) to assemble the model")
    schedule = CheckpointSchedule(checkpoint_every, checkpoint_seconds)
    device = resolve_device(device)
    check_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    shard = WorkerShard({s: source.split_rows(s) for s in SPLITS}, rank, world)
    rows = shard.rows
    if start is not None:
        if start.shape != (source.n_cells, module.config.representation_dim):
            raise AtlasDGDError(f"start representations of shape {start.shape} do not fit {source.n_cells} cells x "
                                f"{module.config.representation_dim} dimensions")
        init = np.ascontiguousarray(start, dtype=np.float32)
    else:
        log.info("start: PCA of %d training cells for the representations (%s)", len(rows["train"]), cfg.init)
        t0 = time.perf_counter()
        init = initial_representations(module, source, cfg, rows["train"])  # every cell, the same on every worker
        log.info("start: representations of %d cells ready in %.1f s", source.n_cells, time.perf_counter() - t0)
    if cfg.init == "pca" and start is None:
        labels = None if label_codes is None else label_codes[rows["train"]]
        start_mixture(module, init[rows["train"], : module.config.latent_dim], labels, n_labels, cfg)
        log.info("start: mixture of %d components fitted (%s)", module.config.n_components, cfg.gmm_init)
    module.to(device)
    module.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else None
    sync.broadcast_module(module)
    mine = {s: shard.mine(s) for s in SPLITS}  # this worker's cells

    def loader(split: str):
        return source.loader(rows[split], cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                             device=device, count_summaries=split == "train")

    # no table for the test cells: they are mapped as new cells after training (their own search)
    tables = {s: RepresentationTable(torch.from_numpy(init[mine[s]]), cfg.lr_representation, cfg.betas, device=device)
              for s in ("train", "validation")}
    del init  # the tables hold this worker's rows from here on
    release_free_memory()  # the start's reads and scratch, before the epochs allocate their own
    has_val = len(rows["validation"]) > 0
    trainer = Trainer(module, cfg, tables["train"], tables["validation"] if has_val else None,
                      n_train_total=len(rows["train"]))
    checkpoints = Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
    if checkpoints is not None and not resume:
        checkpoints.clear()
    resume_state = None
    if checkpoints is not None and resume and (latest := checkpoints.latest()) is not None:
        state, best = checkpoints.load(latest, trainer, mine)
        resume_state = {"epoch": state["epoch"], "history": state["history"], "stopper": state["stopper"],
                        "snapshot": None if best is None else
                        Snapshot(best["module"], {s: best.get(s) for s in ("train", "validation")})}

    def after_epoch(epoch, history, stopper):
        if checkpoints is None or not schedule.due(epoch):
            return
        best = None if stopper is None else stopper.snapshot  # its tables are read only if not yet written
        checkpoints.save(epoch, trainer, mine, {"history": history,
                                                "stopper": None if stopper is None else stopper.state_dict()}, best,
                         best_epoch=None if stopper is None else stopper.best_epoch)
        schedule.written()

    log.info("training: %d training and %d validation cells on %s, batch %d, at most %d epochs", len(rows["train"]),
             len(rows["validation"]), device, cfg.batch_size, cfg.max_epochs)
    history = trainer.fit(loader("train"), loader("validation") if has_val else None,
                          progress=progress and rank == 0, on_epoch=on_epoch, resume=resume_state,
                          after_epoch=after_epoch)
    module.eval()
    module.autocast_dtype = None  # precision is a training setting: mapping and outputs run in fp32, as after load
    for table in tables.values():  # no step follows: the moments would only raise the peak of what comes next
        table.release_optimizer_state()
    del trainer
    release_free_memory()  # the epochs' buffers, before the held-out cells' search
    values = {s: to_numpy(table.values) for s, table in tables.items()}
    values["test"] = np.zeros((0, module.config.representation_dim), dtype=np.float32)
    log.info("training: stopped after %d epochs", len(history))
    if len(mine["test"]):  # held-out cells are mapped the way new cells are
        log.info("test cells: mapping %d held-out cells for %d epochs", len(mine["test"]), cfg.heldout_epochs)
        options = MappingOptions(lr=cfg.lr_representation, betas=cfg.betas, seed=cfg.seed, epochs=cfg.heldout_epochs,
                                 memory_budget=HELDOUT_MEMORY_BUDGET)
        values["test"] = map_cells(module, source, options, rows=mine["test"], progress=progress and rank == 0).values
    dim = module.config.representation_dim
    if world > 1:  # rows travel once, through the model URI, to worker 0
        write_final_rows(checkpoint_uri, storage_options, np.concatenate([mine[s] for s in SPLITS]),
                         np.concatenate([values[s].reshape(-1, dim) for s in SPLITS]))
        if rank != 0:
            return RunResult(history, None, None)
        all_values = read_final_rows(checkpoint_uri, storage_options, source.n_cells, dim)
    else:
        all_values = np.zeros((source.n_cells, dim), dtype=np.float32)
        for s in SPLITS:
            all_values[mine[s]] = values[s]
    release_free_memory()  # before the caller builds the output tables
    train_rows = rows["train"]
    library = LibraryModel.fit({m: source.library(m)[train_rows] for m in source.modalities},
                               {m: o[train_rows] for m, o in source.observed.items()})
    return RunResult(history, all_values, library)
