"""A training step compiled (``TrainConfig.compile``): forward, backward and the representation
rows' Adam as one graph, then the dense parameters' fused Adam(W).

Why: a CPU step of 128 cells x 2,000 genes ran ~440 torch operators. With only the loss compiled,
autograd's bookkeeping, three optimisers' Python and the row update still cost more than the matrix
products (5.7 ms a step against 1.3 ms, ``benchmarks/step_profile.py``). Here
``torch.func.grad_and_value`` puts the backward into the traced graph and
:func:`~atlasdgd.optim.row_adam.adam_rows` follows in it. The dense parameters step with torch's own
functional Adam (``torch.optim.adam.adam``, the optimisers' arithmetic on their state tensors, so
checkpoints and the eager step see one state), outside the graph, after the gradients are summed
over workers where there are several.

One shape is compiled: batches of ``batch_size`` cells. Shorter ones (the plan spreads an epoch's
cells evenly, so most are a cell or two short) are padded with rows whose terms weigh 0 and whose
row update repeats the first row's, so the table's scatter writes equal values twice. The counts
above a batch's histogram width vary in number (~1,400 of 95k non-zeros in a batch of the simulated
2,000-gene atlas): they are padded to a capacity with entries at the width, whose terms are zero; a
batch with more compiles once more for twice the capacity.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.optim.adam import adam

from atlasdgd.data.count_summary import summarize_counts
from atlasdgd.model.module import Batch, DGDModule, LossTerms
from atlasdgd.model.nb import CountSummary, histogram_terms_total, large_count_terms, nonzero_entries
from atlasdgd.optim.row_adam import RepresentationTable, adam_rows

log = logging.getLogger(__name__)


class _StepObjective(nn.Module):
    """The training objective of a padded batch as a module, so ``functional_call`` can take its
    dense parameters as inputs (and ``grad_and_value`` differentiate in them)."""

    def __init__(self, module: DGDModule, hyperprior_weight: float, l1: float):
        super().__init__()
        self.module, self.hyperprior_weight, self.l1 = module, hyperprior_weight, l1

    def forward(self, z, counts, library, covariates, cell_weight, modality_weight, histograms, large_cols,
                large_values, inv_batch, workers: int):
        m = self.module
        log_library = {k: torch.log(v.clamp_min(1e-12)) for k, v in library.items()}
        dense, basal_nll, cov_terms, hyperprior = m.smooth_terms(z, counts, log_library, covariates)
        recon = {k: d * modality_weight[k] for k, d in dense.items()}
        basal_nll = basal_nll * cell_weight
        cov_terms = {k: c * cell_weight for k, c in cov_terms.items()}
        batch_parts = {}
        for k, histogram in histograms.items():
            r = m.dispersion(k)
            large = large_count_terms(large_cols[k], large_values[k], r, histogram.shape[1])
            batch_parts[k] = -(histogram_terms_total(histogram, r) + large.sum())
        objective = basal_nll.sum()
        for part in (*recon.values(), *cov_terms.values(), *batch_parts.values()):
            objective = objective + part.sum()
        loss = objective * inv_batch - self.hyperprior_weight * hyperprior / workers
        if self.l1 > 0:
            weights = [p.abs().sum() for n, p in m.decoder.named_parameters() if "weight" in n]
            loss = loss + self.l1 * sum(weights) / workers
        return loss, (objective.detach(), recon, basal_nll, cov_terms, batch_parts)


class CompiledStep:
    """Trains one batch of at most ``batch_size`` cells per call; see the module docstring."""

    def __init__(self, module: DGDModule, optimizers: list[torch.optim.Optimizer], table: RepresentationTable,
                 batch_size: int, hyperprior_weight: float, l1: float):
        self.module, self.optimizers, self.table, self.batch_size = module, optimizers, table, batch_size
        self.objective = _StepObjective(module, hyperprior_weight, l1)
        names = {p: "module." + n for n, p in module.named_parameters()}
        self.groups = [(opt, group) for opt in optimizers for group in opt.param_groups]
        self.params = [p for _, group in self.groups for p in group["params"]]
        self.names = [names[p] for p in self.params]
        for opt, group in self.groups:
            _initial_state(opt, group)
        self.modalities = list(module.config.modalities)
        self._last_signature = None
        self.large_capacity = {m: 0 for m in self.modalities}  # padded length of each modality's large counts
        self._gradients = torch.compile(self._forward_backward, dynamic=False)

    def accepts(self, batch: Batch) -> bool:
        """Whether this batch has the compiled shape (else the trainer steps it eagerly)."""
        return (0 < len(batch) <= self.batch_size and batch.features is None
                and list(batch.counts) == self.modalities)

    def __call__(self, batch: Batch, inv_batch: float, workers: int, sync=None) -> tuple[LossTerms, torch.Tensor]:
        """One step on ``batch``: ``inv_batch`` divides the summed objective (1 / the global batch),
        ``sync`` sums the dense gradients over ``workers`` (needed when there are several)."""
        n = len(batch)
        inputs = self._inputs(batch, inv_batch, workers)
        table = (self.table.values, self.table.exp_avg, self.table.exp_avg_sq, self.table.steps)
        states = self._states()
        # torch.compile checks its guards on every input tensor per call (0.2 ms of a 3.3 ms CPU step,
        # measured); they run only when something they cover may have changed
        signature = self._signature(batch, workers, inputs)
        skip_guards, self._last_signature = signature == self._last_signature, signature
        # the graph differentiates itself (torch.func): no autograd tape around it
        with torch.no_grad(), torch.compiler.set_stance(skip_guard_eval_unsafe=skip_guards):
            grads, out = self._gradients(self.params, table, *inputs)
        if workers > 1:
            for p, g in zip(self.params, grads):
                p.grad = g
            sync(self.params)
            grads = [p.grad for p in self.params]
        self._dense_update(grads, states)
        objective, recon, basal_nll, cov_terms, batch_parts = out
        terms = LossTerms({k: v[:n] for k, v in recon.items()}, basal_nll[:n],
                          {k: v[:n] for k, v in cov_terms.items()}, batch_parts)
        return terms, objective

    # -- the graph ---------------------------------------------------------------------------
    def _forward_backward(self, params, table, index, source, *inputs):
        values, exp_avg, exp_avg_sq, steps = table
        z = values[index]
        grad_fn = grad_and_value(self._objective, argnums=(0, 1), has_aux=True)
        (grads, grad_z), (_, out) = grad_fn(params, z, *inputs)
        rows = adam_rows(z, exp_avg[index], exp_avg_sq[index], steps[index], grad_z, self.table.lr,
                         self.table.betas, self.table.eps)
        for target, new in zip(table, rows):
            target.index_put_((index,), new[source])  # padding rows repeat the first row's update
        return grads, out

    def _objective(self, params, z, *inputs):
        return functional_call(self.objective, dict(zip(self.names, params)), (z, *inputs))

    # -- eager --------------------------------------------------------------------------------
    @torch.no_grad()
    def _dense_update(self, grads, states):
        """Each optimiser group's step by torch's functional Adam with the group's own settings (fused
        where the trainer made it so): the optimisers' arithmetic on their state without their Python
        ``step`` (~0.1 ms each). Eager because Inductor's code for it, traced into the graph, took
        1.1 ms a step against 0.11 ms for the fused kernel (CPU, 230k parameters, kernel profile)."""
        start = 0
        for (opt, group), (exp_avgs, exp_avg_sqs, steps) in zip(self.groups, states):
            end = start + len(group["params"])
            beta1, beta2 = group["betas"]
            adam(group["params"], grads[start:end], exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                 fused=group["fused"], capturable=group["capturable"], differentiable=False,
                 decoupled_weight_decay=group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)),
                 amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=group["maximize"])
            start = end

    def _signature(self, batch: Batch, workers: int, inputs: tuple) -> tuple:
        """What the compiled graph depends on besides the padded batch's fixed shapes: while it stays
        the same, the graph compiled for it is the one to run (a change runs torch.compile's guards,
        which recompile if needed)."""
        histograms, large_cols = inputs[7], inputs[8]  # (see _inputs)
        values = self.table.values
        return (self.table.lr, self.table.betas, self.table.eps, values.shape, values.dtype, values.device,
                self.module.autocast_dtype, self.module.training, workers, batch.covariates is None,
                tuple(x.dtype for x in batch.counts.values()), batch.index.device,
                tuple(p.dtype for p in self.params), tuple(h.shape for h in histograms.values()),
                tuple(c.shape for c in large_cols.values()))

    def _states(self):
        out = []
        for opt, group in self.groups:
            state = [opt.state[p] for p in group["params"]]
            out.append(([s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [s["step"] for s in state]))
        return out

    def _inputs(self, batch: Batch, inv_batch: float, workers: int) -> tuple:
        n, size = len(batch), self.batch_size
        pad = size - n
        device = batch.index.device
        index, source = batch.index, torch.arange(size, device=device)
        cell_weight = torch.ones(size, device=device)
        if pad:
            index = torch.cat([index, index[:1].expand(pad)])
            source[n:] = 0
            cell_weight[n:] = 0
        counts = {m: _pad_rows(x, pad) for m, x in batch.counts.items()}
        library = {m: _pad_rows(v, pad) for m, v in batch.library.items()}
        covariates = None if batch.covariates is None else _pad_rows(batch.covariates, pad)
        modality_weight = {m: cell_weight if batch.observed is None or m not in batch.observed
                           else cell_weight * _pad_rows(batch.observed[m].to(cell_weight.dtype), pad)
                           for m in batch.counts}
        histograms, large_cols, large_values = {}, {}, {}
        for m in batch.counts:
            summary = _summary(batch, m)
            histograms[m] = summary.histogram
            large_cols[m], large_values[m] = self._padded_large(m, summary)
        inv = torch.tensor(inv_batch, device=device)
        return (index, source, counts, library, covariates, cell_weight, modality_weight, histograms, large_cols,
                large_values, inv, workers)

    def _padded_large(self, m: str, summary: CountSummary) -> tuple[torch.Tensor, torch.Tensor]:
        """The summary's counts above its width, padded to this modality's capacity with counts at
        the width (terms zero); the capacity grows to a power of two with 25% room when a batch needs it."""
        cols, values = summary.large_cols, summary.large_values
        if len(values) > self.large_capacity[m]:
            capacity = max(64, 1 << (int(1.25 * len(values)) - 1).bit_length())
            if self.large_capacity[m]:
                log.info("training: %d %s counts above %d in one batch; compiling the step for up to %d",
                         len(values), m, summary.width, capacity)
            self.large_capacity[m] = capacity
        pad = self.large_capacity[m] - len(values)
        return (torch.cat([cols, cols.new_zeros(pad)]),
                torch.cat([values, values.new_full((pad,), float(summary.width))]))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if not rows:
        return t
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])


def _summary(batch: Batch, m: str) -> CountSummary:
    """The loader's count summary of modality ``m``, or one built here from the batch's non-zeros
    (a loader not asked for summaries; cells without the modality left out)."""
    if batch.count_summaries is not None and m in batch.count_summaries:
        return batch.count_summaries[m]
    x = batch.counts[m]
    rows, cols, values = batch.nonzeros[m] if batch.nonzeros is not None and m in batch.nonzeros else nonzero_entries(x)
    if batch.observed is not None and m in batch.observed:
        keep = batch.observed[m][rows.long()]
        cols, values = cols[keep], values[keep]
    summary = summarize_counts(cols.cpu().numpy(), values.cpu().numpy(), x.shape[1])
    return summary.to(x.device)


def _initial_state(opt: torch.optim.Optimizer, group: dict) -> None:
    """The Adam state torch's optimiser creates at its first step (the step count a 0-d float32
    tensor, on the parameter's device when fused or capturable, else on the CPU)."""
    for p in group["params"]:
        if not opt.state[p]:
            on_device = group["fused"] or group["capturable"]
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
