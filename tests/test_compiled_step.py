"""Training with the step's dense part compiled (TrainConfig.compile) against eager training."""

import copy
import logging

import torch

import atlasdgd
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer


def _setup(compile_step: bool, module=None):
    data = atlasdgd.simulate(n_cells=330, n_genes=60, n_types=3, n_batches=2, seed=0)
    model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"], split_fractions=(1.0, 0.0, 0.0), seed=0)
    rows = model.data.split_rows("train")
    module = module if module is not None else model.module
    start = torch.randn(len(rows), model.model_config.representation_dim, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(module, TrainConfig(batch_size=64, compile=compile_step), RepresentationTable(start))
    return trainer, model.data.loader(rows, 64, seed=0)


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
    assert compiled._smooth is not None  # it compiled, and did not fall back
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
    assert compiled._smooth is None


def test_a_batch_without_covariates_trains_compiled():
    # Batch.covariates may be None (a model without covariates): the compiled path pads what is there
    # and passes None on, instead of falling back as if compiling had failed
    data = atlasdgd.simulate(n_cells=200, n_genes=40, n_types=2, n_batches=1, seed=0)
    model = atlasdgd.DGD(data, label_key="cell_type", split_fractions=(1.0, 0.0, 0.0), seed=0)
    rows = model.data.split_rows("train")
    start = torch.zeros(len(rows), model.model_config.representation_dim)
    eager = Trainer(model.module, TrainConfig(batch_size=64), RepresentationTable(start))
    compiled = Trainer(copy.deepcopy(model.module), TrainConfig(batch_size=64, compile=True), RepresentationTable(start))
    batch = next(iter(model.data.loader(rows, 64, seed=0)))
    batch.covariates = None
    assert len(batch) < 64
    a, _ = eager.train_step(batch)
    b, _ = compiled.train_step(batch)
    assert compiled._smooth is not None
    torch.testing.assert_close(b.per_cell(), a.per_cell(), rtol=1e-4, atol=1e-3)
