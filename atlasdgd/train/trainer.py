"""The training loop of one worker (a single process is a world of size one).

A minibatch: loader -> Batch -> representation rows of its cells -> decoder -> losses ->
gradients -> synced step for the dense parameters and a row-local step for the rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch

from atlasdgd.infer.fit import EpochStats, representation_step
from atlasdgd.model.module import Batch, DGDModule
from atlasdgd.runtime.sync import all_reduce_sum, allreduce_gradients, world_size
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.train.compiled_step import CompiledStep
from atlasdgd.train.config import TrainConfig, compiles_step
from atlasdgd.train.early_stopping import EarlyStopping, Snapshot

log = logging.getLogger(__name__)


def fused_optimizer_options(module: torch.nn.Module) -> dict:
    """``{"fused": True}`` where torch has a fused Adam for the parameters' device and dtype: one
    kernel per parameter group instead of ~10 element-wise ops per tensor (the for-loop Adam was
    ~12% of a CPU training step, measured); ``{}`` elsewhere (torch's default)."""
    params = list(module.parameters())
    ok = params and all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
                        for p in params)
    return {"fused": True} if ok and len({p.device for p in params}) == 1 else {}


class Trainer:
    """Owns the optimisers of the dense parameters and the representation tables of one worker."""

    def __init__(
        self,
        module: DGDModule,
        config: TrainConfig,
        train_table: RepresentationTable,
        val_table: RepresentationTable | None = None,
        n_train_total: int | None = None,
        sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ):
        self.module, self.config = module, config
        self.train_table, self.val_table = train_table, val_table
        self.n_train_total = n_train_total or len(train_table)
        # summing dense gradients over data-parallel workers (a no-op in one process)
        self.sync_gradients = sync_gradients or allreduce_gradients
        betas = config.betas
        fused = fused_optimizer_options(module)
        self.optimizers = [torch.optim.AdamW(module.decoder_parameters(), lr=config.lr_decoder, betas=betas,
                                             weight_decay=config.weight_decay, **fused)]
        self.em = config.mixture_step == "em"
        if not self.em:
            self.optimizers.append(torch.optim.Adam(module.basal_parameters(), lr=config.lr_basal_gmm, betas=betas,
                                                    **fused))
        if module.covariate_gmms:
            self.optimizers.append(torch.optim.Adam(module.covariate_parameters(), lr=config.lr_covariate_gmm,
                                                    betas=betas, **fused))
        self.n_features = dict(module.config.modalities)
        self.dense_params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        # the whole step compiled for batches of batch_size cells (config.compile; shorter ones are
        # padded, see atlasdgd.train.compiled_step); None: eager
        self._compiled: CompiledStep | None = None
        self._compiled_ran = False
        device = next(module.parameters()).device
        if compiles_step(config, self.n_train_total // world_size(), device):
            why = " (compile='auto': a large CPU run; compile=False turns it off)" if config.compile == "auto" else ""
            log.info("training: compiling the training step with torch.compile (once, ~30 s on 2 CPU cores)%s", why)
            self._compiled = CompiledStep(module, self.optimizers, train_table, config.batch_size,
                                          self.hyperprior_weight, config.l1)

    @property
    def hyperprior_weight(self) -> float:
        """Weight of -log p(phi) in a minibatch's per-cell mean loss."""
        return 1.0 / self.n_train_total if self.config.hyperprior == "dataset" else 1.0

    def train_step(self, batch: Batch):
        # N workers optimise the objective of one process on the union of their batches: divide by
        # the global batch size; terms counted once per step are split over the workers
        workers = world_size()
        global_batch = all_reduce_sum([len(batch)])[0] if workers > 1 else len(batch)
        if self._compiled is not None and self._compiled.accepts(batch):
            try:
                terms, objective = self._compiled(batch, 1.0 / global_batch, workers, self.sync_gradients)
            except Exception as e:  # no C++ compiler, a backend or operator it cannot compile: go on eagerly
                if self._compiled_ran:
                    raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("training: torch.compile of the step failed (%s); training goes on without it", reason)
                self._compiled = None
            else:
                self._compiled_ran = True
                self._more_representation_steps(batch)
                return terms, objective
        z = self.train_table.gather(batch.index)
        terms = self.module.losses(batch, z, batch_sums=True)
        objective = terms.total()
        loss = objective / global_batch - self.hyperprior_weight * self.module.hyperprior_log_prob() / workers
        if self.config.l1 > 0:
            l1 = sum(p.abs().sum() for n, p in self.module.decoder.named_parameters() if "weight" in n)
            loss = loss + self.config.l1 * l1 / workers
        # one pass instead of each optimiser's zero_grad (0.4 ms of a 16 ms CPU step in their hooks, measured)
        for p in self.dense_params:
            p.grad = None
        if self.em:  # the basal mixture moves once per epoch (_components); no gradient for it
            for p in self.module.basal_parameters():
                p.grad = None
        loss.backward()
        self.sync_gradients(self.dense_params)
        for opt in self.optimizers:
            opt.step()
        self.train_table.step(batch.index, z.grad)
        self._more_representation_steps(batch)
        return terms, objective.detach()

    def _more_representation_steps(self, batch: Batch) -> None:
        if self.config.representation_steps > 1:
            representation_step(self.module, batch, self.train_table, self.config.representation_steps - 1,
                                batch_mean=True)

    def train_epoch(self, loader: Iterable[Batch]) -> dict[str, float]:
        self.module.train()
        stats = EpochStats(self.n_features)
        for batch in loader:
            terms, obj = self.train_step(batch)
            stats.add(batch, terms, obj)
        return {**stats.all_reduce().summary("train"), **self._components()}

    @torch.no_grad()
    def _components(self, block: int = 65_536) -> dict[str, float]:
        """Per mixture component: training cells it holds at the end of the epoch and its weight
        (history columns, to see components die or swallow others; summed over workers). Counted
        once per epoch over the table, off the per-step path. With ``mixture_step="em"`` the
        mixture's M-step runs first, on statistics summed over blocks and workers."""
        basal, dim = self.module.basal, self.module.config.latent_dim
        values = self.train_table.values
        reseeded: list[int] = []
        if self.em:
            k = basal.n_components
            stats = [torch.zeros(k, dtype=torch.float64, device=values.device),
                     *(torch.zeros(k, dim, dtype=torch.float64, device=values.device) for _ in "12")]
            for start in range(0, len(values), block):
                # the argmax counts (4th statistic) are left out: re-seeding by responsibility mass
                # measured better (SNARE-seq: re-seeding every component that wins no cell kept all
                # 15 in use but split the large types, ARI 0.27 vs 0.33)
                for total, part in zip(stats, basal.sufficient_statistics(values[start : start + block, :dim])[:3]):
                    total += part
            flat = torch.tensor(all_reduce_sum(torch.cat([t.reshape(-1) for t in stats]).tolist()),
                                dtype=torch.float64, device=values.device)
            n, s1, s2 = flat.split([k, k * dim, k * dim])
            reseeded = basal.maximize(n, s1.view(-1, dim), s2.view(-1, dim), None,
                                      prior_weight=self.hyperprior_weight * self.n_train_total)
        cells = torch.zeros(basal.n_components, dtype=torch.float64, device=values.device)
        for start in range(0, len(values), block):
            cells += torch.bincount(basal.cluster(values[start : start + block, :dim]), minlength=len(cells)).double()
        counts = all_reduce_sum(cells.cpu().tolist())
        weights = torch.softmax(basal.logits, 0).cpu().tolist()
        out = {f"component_{i}_cells": int(c) for i, c in enumerate(counts)}
        out.update({f"component_{i}_weight": float(w) for i, w in enumerate(weights)})
        if self.em:
            out["components_reseeded"] = len(reseeded)
        return out

    def validation_epoch(self, loader: Iterable[Batch]) -> dict[str, float]:
        """One representation step for every validation cell; reports the loss before the step."""
        stats = EpochStats(self.n_features)
        for batch in loader:
            terms = representation_step(self.module, batch, self.val_table, self.config.representation_steps,
                                        batch_mean=True)
            stats.add(batch, terms, terms.per_cell().detach().sum())
        return stats.all_reduce().summary("val")

    def state_dict(self) -> dict:
        """Everything a resumed run needs: weights, optimiser states and both representation tables."""
        return {
            "module": self.module.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "train": self.train_table.state_dict(),
            "validation": None if self.val_table is None else self.val_table.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)  # moves the moments to the parameters' device
        self.train_table.load_state_dict(state["train"])
        if self.val_table is not None and state.get("validation") is not None:
            self.val_table.load_state_dict(state["validation"])

    def state(self) -> Snapshot:
        """What early stopping keeps: dense weights (in memory) and the representation values (on disk)."""
        return Snapshot({k: v.detach().clone() for k, v in self.module.state_dict().items()},
                        {"train": self.train_table.values,
                         "validation": None if self.val_table is None else self.val_table.values})

    def restore(self, state: Snapshot) -> None:
        """Back to a :meth:`state`: its tables are read back into the representation tables."""
        self.module.load_state_dict(state["module"])
        self.train_table.values = state["train"].to(self.train_table.device).contiguous()
        if self.val_table is not None and (val := state["validation"]) is not None:
            self.val_table.values = val.to(self.val_table.device).contiguous()

    def fit(
        self,
        train_loader,
        val_loader=None,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
        resume: dict | None = None,
        after_epoch: Callable[[int, list[dict], EarlyStopping | None], None] | None = None,
    ) -> list[dict]:
        """Train until early stopping (needs validation cells) or ``max_epochs``; keep the best state.

        ``resume`` (from a checkpoint: ``epoch``, ``history``, ``stopper``, ``snapshot``) continues a run;
        ``after_epoch`` is called after each epoch's bookkeeping (checkpoints), before the stop test.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        stopper = EarlyStopping(cfg.min_epochs, cfg.patience) if val_loader is not None else None
        history: list[dict] = []
        start = 0
        if resume is not None:
            history, start = list(resume["history"]), resume["epoch"] + 1
            if stopper is not None:
                stopper.load_state_dict(resume["stopper"])
                stopper.snapshot = resume.get("snapshot")
        finished = stopper is not None and start > 0 and stopper.should_stop(start - 1)
        bar = tqdm(range(start, cfg.max_epochs if not finished else start), desc="training", unit="epoch",
                   disable=not progress, dynamic_ncols=True, initial=start, total=cfg.max_epochs)
        for epoch in bar:
            t0 = time.perf_counter()
            for loader in (train_loader, val_loader):
                if loader is not None and hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
            row = {"epoch": epoch, **self.train_epoch(train_loader)}
            if val_loader is not None:
                row.update(self.validation_epoch(val_loader))
            row["seconds"] = time.perf_counter() - t0
            row["wall_time"] = time.time()  # epoch end, Unix seconds: epoch 0 began at wall_time - seconds
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            post = {"loss": f"{row['train_loss']:.4g}", "recon": f"{row['train_recon']:.4f}"}
            if "val_recon" in row:
                post["val_recon"] = f"{row['val_recon']:.4f}"
            bar.set_postfix(post)
            log.debug("epoch %d: %s (%.1f s)", epoch, ", ".join(f"{k} {v}" for k, v in post.items()), row["seconds"])
            if not math.isfinite(row["train_loss"]):
                raise FloatingPointError(f"training loss became {row['train_loss']} at epoch {epoch}: lower the learning rates")
            if stopper is not None and stopper.update(epoch, row["val_recon"]):
                stopper.keep(self.state())
            if after_epoch is not None:
                after_epoch(epoch, history, stopper)
            if stopper is not None and stopper.should_stop(epoch):
                break
        bar.close()
        if stopper is not None and stopper.best_epoch >= 0:
            log.info("training: best validation reconstruction at epoch %d", stopper.best_epoch)
        if stopper is not None and stopper.snapshot is not None:
            self.restore(stopper.snapshot)
            stopper.keep(None)  # its file goes now, not when the stopper is collected
            for row in history:
                row["best"] = row["epoch"] == stopper.best_epoch
        return history
