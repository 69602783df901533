"""Training with the step's dense part compiled (TrainConfig.compile) against eager training."""

import copy
import logging

import mudata
import pytest
import torch

import atlasdgd
from atlasdgd.data.count_summary import summarize_counts
from atlasdgd.model.nb import nonzero_entries
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer


def _setup(compile_step: bool, module=None, count_summaries: bool = True):
    data = atlasdgd.simulate(n_cells=330, n_genes=60, n_types=3, n_batches=2, seed=0)
    model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"], split_fractions=(1.0, 0.0, 0.0), seed=0)
    rows = model.data.split_rows("train")
    module = module if module is not None else model.module
    start = torch.randn(len(rows), model.model_config.representation_dim, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(module, TrainConfig(batch_size=64, compile=compile_step), RepresentationTable(start))
    return trainer, model.data.loader(rows, 64, seed=0, count_summaries=count_summaries)


def test_compiled_training_steps_equal_eager_ones_on_short_batches():
    eager, loader = _setup(False)
    compiled, _ = _setup(True, copy.deepcopy(eager.module))
    batches = list(loader)
    assert all(len(b) < 64 for b in batches)  # 330 cells in 6 batches of 55: padded to the compiled 64
    for batch in batches + batches[:2]:
        a, _ = eager.train_step(batch)
        b, _ = compiled.train_step(batch)
        torch.testing.assert_close(b.per_cell(), a.per_cell(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.total(), a.total(), rtol=1e-5, atol=1e-2)
    assert compiled._compiled is not None  # it compiled, and did not fall back
    for (name, p), q in zip(eager.module.named_parameters(), compiled.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(compiled.train_table.values, eager.train_table.values, rtol=1e-3, atol=1e-4)


def test_a_step_that_cannot_compile_warns_once_and_trains_eagerly(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, loader = _setup(False)
    compiled, _ = _setup(True, copy.deepcopy(eager.module))
    batches = list(loader)[:3]
    with caplog.at_level(logging.WARNING, logger="atlasdgd"):
        for batch in batches:
            a, _ = eager.train_step(batch)
            b, _ = compiled.train_step(batch)
            torch.testing.assert_close(b.per_cell(), a.per_cell())
    failed = [r for r in caplog.records if "torch.compile of the step failed" in r.getMessage()]
    assert len(failed) == 1 and "cc not found" in failed[0].getMessage()
    assert compiled._compiled is None


def test_a_batch_without_covariates_trains_compiled():
    # Batch.covariates may be None (a model without covariates): the compiled path pads what is there
    # and passes None on, instead of falling back as if compiling had failed
    data = atlasdgd.simulate(n_cells=200, n_genes=40, n_types=2, n_batches=1, seed=0)
    model = atlasdgd.DGD(data, label_key="cell_type", split_fractions=(1.0, 0.0, 0.0), seed=0)
    rows = model.data.split_rows("train")
    start = torch.zeros(len(rows), model.model_config.representation_dim)
    eager = Trainer(model.module, TrainConfig(batch_size=64), RepresentationTable(start))
    compiled = Trainer(copy.deepcopy(model.module), TrainConfig(batch_size=64, compile=True), RepresentationTable(start))
    batch = next(iter(model.data.loader(rows, 64, seed=0, count_summaries=True)))
    batch.covariates = None
    assert len(batch) < 64
    a, _ = eager.train_step(batch)
    b, _ = compiled.train_step(batch)
    assert compiled._compiled is not None
    torch.testing.assert_close(b.per_cell(), a.per_cell(), rtol=1e-4, atol=1e-3)


def _close_modules(a, b, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=name)


def test_compiled_steps_of_two_modalities_with_missing_cells_equal_eager_ones():
    # MuData with 40 cells lacking ATAC: their ATAC terms weigh 0 in the compiled graph as in the
    # eager loss; RNA counts above the histogram's width go through the eager large-count terms
    data = atlasdgd.simulate(n_cells=300, n_genes=50, n_peaks=300, n_types=3, n_batches=2, seed=3)
    md = mudata.MuData({"rna": data["rna"].copy(), "atac": data["atac"][40:].copy()})
    md.obs["cell_type"] = data.obs["cell_type"].to_numpy()
    md.obs["batch"] = data.obs["batch"].to_numpy()
    model = atlasdgd.DGD(md, label_key="cell_type", covariate_keys=["batch"], split_fractions=(1.0, 0.0, 0.0), seed=0)
    rows = model.data.split_rows("train")
    start = torch.randn(len(rows), model.model_config.representation_dim, generator=torch.Generator().manual_seed(2))
    eager = Trainer(model.module, TrainConfig(batch_size=64), RepresentationTable(start))
    compiled = Trainer(copy.deepcopy(model.module), TrainConfig(batch_size=64, compile=True), RepresentationTable(start))
    batches = list(model.data.loader(rows, 64, seed=1, count_summaries=True))
    assert any(b.observed is not None and not b.observed["atac"].all() for b in batches)
    assert any(b.count_summaries["rna"].large_values.numel() > 0 for b in batches)
    for batch in batches:
        a, _ = eager.train_step(batch)
        b, _ = compiled.train_step(batch)
        torch.testing.assert_close(b.per_cell(), a.per_cell(), rtol=1e-4, atol=1e-3)
        for m in ("rna", "atac"):
            torch.testing.assert_close(b.reconstruction_batch[m], a.reconstruction_batch[m], rtol=1e-5, atol=1e-2)
    assert compiled._compiled is not None
    _close_modules(eager.module, compiled.module, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(compiled.train_table.values, eager.train_table.values, rtol=1e-3, atol=1e-4)
    # the optimisers' own state moved with the graph: an eager step from it is the same step
    for opt_a, opt_b in zip(eager.optimizers, compiled.optimizers):
        for p_a, p_b in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
            assert float(opt_b.state[p_b]["step"]) == float(opt_a.state[p_a]["step"]) == len(batches)
            torch.testing.assert_close(opt_b.state[p_b]["exp_avg_sq"], opt_a.state[p_a]["exp_avg_sq"],
                                       rtol=1e-3, atol=1e-8)


def test_a_batch_without_count_summaries_steps_as_one_with_them():
    trainer, loader = _setup(True, count_summaries=False)
    other, summarised = _setup(True, copy.deepcopy(trainer.module))
    plain, with_summaries = next(iter(loader)), next(iter(summarised))
    assert plain.count_summaries is None
    a, obj_a = trainer.train_step(plain)
    b, obj_b = other.train_step(with_summaries)
    torch.testing.assert_close(obj_a, obj_b)
    # not bit-equal: Inductor sums the large counts' gradient in r with parallel atomic adds
    _close_modules(trainer.module, other.module)


def test_the_split_graphs_of_several_workers_equal_the_whole_step():
    # two workers holding the same batch: their summed gradients at 1 / (2n) each equal one
    # process's at 1 / n, so gradients, then the sum, then the update equal the one-graph step
    whole, loader = _setup(True)
    split, _ = _setup(True, copy.deepcopy(whole.module))
    for batch in list(loader)[:2]:
        n = len(batch)
        whole._compiled(batch, 1.0 / n, 1)

        def two_workers(params):
            for p in params:
                p.grad.mul_(2)

        split._compiled(batch, 1.0 / (2 * n), 2, two_workers)
    _close_modules(whole.module, split.module)
    torch.testing.assert_close(split.train_table.values, whole.train_table.values)


def test_a_learning_rate_changed_between_steps_reaches_the_compiled_step():
    # the compiled step skips torch.compile's guards while its inputs stay alike; a new learning rate
    # of the representations must still recompile rather than run the graph that has the old one built
    # in (the dense parameters' step is outside the graph)
    eager, loader = _setup(False)
    compiled, _ = _setup(True, copy.deepcopy(eager.module))
    batches = list(loader)[:3]
    for i, batch in enumerate(batches):
        if i == 2:
            for trainer in (eager, compiled):
                trainer.optimizers[0].param_groups[0]["lr"] = 0.05
                trainer.train_table.lr = 0.05
        eager.train_step(batch)
        compiled.train_step(batch)
        _close_modules(eager.module, compiled.module, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(compiled.train_table.values, eager.train_table.values, rtol=1e-3, atol=1e-4)
    assert compiled._compiled is not None


def test_a_batch_with_more_large_counts_or_another_histogram_width_compiles_again():
    # the counts above the histogram width are padded to a capacity: a batch with more of them (here
    # the same cells summarised at width 2 instead of 32) recompiles instead of running the old graph
    eager, loader = _setup(False)
    compiled, _ = _setup(True, copy.deepcopy(eager.module))
    first, second = list(loader)[:2]
    summaries = {}
    for m, x in second.counts.items():
        rows, cols, values = nonzero_entries(x)
        summaries[m] = summarize_counts(cols.numpy(), values.numpy(), x.shape[1], width=2)
    second.count_summaries = summaries
    for batch in (first, second, first):
        a, _ = eager.train_step(batch)
        b, _ = compiled.train_step(batch)
        torch.testing.assert_close(b.total(), a.total(), rtol=1e-5, atol=1e-2)
        _close_modules(eager.module, compiled.module, rtol=1e-3, atol=1e-4)
    capacity = compiled._compiled.large_capacity["rna"]
    assert capacity >= summaries["rna"].large_values.numel() > first.count_summaries["rna"].large_values.numel()
    assert compiled._compiled is not None


def test_compile_auto_compiles_large_cpu_runs_only_and_the_cli_can_say_either():
    from atlasdgd.cli import build_parser
    from atlasdgd.train.config import AUTO_COMPILE_CELLS, compiles_step

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = TrainConfig()
    assert auto.compile == "auto"
    assert compiles_step(auto, AUTO_COMPILE_CELLS, cpu) and not compiles_step(auto, AUTO_COMPILE_CELLS - 1, cpu)
    assert not compiles_step(auto, 10 * AUTO_COMPILE_CELLS, cuda)  # GPU: asked for, not yet a default
    assert compiles_step(TrainConfig(compile=True), 10, cuda) and not compiles_step(TrainConfig(compile=False), 10**7, cpu)
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        TrainConfig(compile="yes")
    trainer, _ = _setup(False)
    big = Trainer(trainer.module, TrainConfig(batch_size=64), trainer.train_table, n_train_total=AUTO_COMPILE_CELLS)
    small = Trainer(trainer.module, TrainConfig(batch_size=64), trainer.train_table)
    assert big._compiled is not None and small._compiled is None
    train = ["train", "data.h5ad", "--out", "m"]
    assert build_parser().parse_args(train).compile is None  # the config's default ("auto") applies
    assert build_parser().parse_args(train + ["--compile"]).compile is True
    assert build_parser().parse_args(train + ["--no-compile"]).compile is False
