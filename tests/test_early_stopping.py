"""Early stopping restores the best epoch's state exactly; its tables wait on disk, not in memory."""

import os

import numpy as np
import pytest
import torch

from atlasdgd.data.adapters import prepare
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.simulate import SimulationConfig, simulate
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.early_stopping import EarlyStopping, Snapshot
from atlasdgd.train.trainer import Trainer


def test_a_snapshot_gives_back_the_tables_as_they_were_when_taken():
    train, module_state = torch.randn(50, 4), {"w": torch.randn(3, 3)}
    snap = Snapshot(module_state, {"train": train, "validation": None})
    kept = train.clone()
    train += 1.0  # training goes on in place after the snapshot
    torch.testing.assert_close(snap["train"], kept, rtol=0, atol=0)
    assert snap["validation"] is None and snap.get("validation") is None
    assert snap.get("test", "absent") == "absent"
    assert snap["module"] is module_state


def test_keeping_a_new_snapshot_closes_the_old_one():
    stopper = EarlyStopping()
    first = Snapshot({}, {"train": torch.zeros(4, 2)})
    stopper.keep(first)
    stopper.keep(Snapshot({}, {"train": torch.ones(4, 2)}))
    assert first._file.closed and not stopper.snapshot._file.closed
    stopper.keep(None)
    assert stopper.snapshot is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_training_ends_at_the_best_epochs_weights_and_representations():
    sim = simulate(SimulationConfig(n_cells=600, n_types=3, n_batches=2, n_genes=40, seed=0))
    data = prepare(sim, label_key="cell_type", covariate_keys=["batch"])
    cfg = ModelConfig(modalities={"rna": 40}, latent_dim=3, n_components=3, covariates={"batch": 2})
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
    rows = {s: data.split_rows(s) for s in ("train", "validation")}
    tables = {s: RepresentationTable(torch.randn(len(r), cfg.representation_dim) * 0.1) for s, r in rows.items()}
    trainer = Trainer(module, TrainConfig(max_epochs=5, min_epochs=5, patience=10), tables["train"],
                      tables["validation"])
    # the validation loss is scripted so the best epoch is neither the first nor the last
    scripted = iter([5.0, 3.0, 4.0, 6.0, 7.0])
    validate = trainer.validation_epoch
    trainer.validation_epoch = lambda loader: {**validate(loader), "val_recon": next(scripted)}
    seen = {}

    def after_epoch(epoch, history, stopper):
        seen[epoch] = ({k: v.clone() for k, v in module.state_dict().items()}, tables["train"].values.clone(),
                       tables["validation"].values.clone())

    files_before = len(os.listdir("/proc/self/fd"))
    history = trainer.fit(data.loader(rows["train"], 64), data.loader(rows["validation"], 64), progress=False,
                          after_epoch=after_epoch)
    assert [row["best"] for row in history] == [False, True, False, False, False]
    weights, train_values, val_values = seen[1]
    assert not torch.equal(train_values, seen[4][1])  # the representations moved after the best epoch
    torch.testing.assert_close(tables["train"].values, train_values, rtol=0, atol=0)
    torch.testing.assert_close(tables["validation"].values, val_values, rtol=0, atol=0)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert len(os.listdir("/proc/self/fd")) == files_before  # the snapshot's file is gone


def test_a_snapshot_stays_in_memory_when_the_temporary_directory_cannot_be_written(monkeypatch, caplog):
    def unwritable(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("atlasdgd.train.early_stopping.tempfile.TemporaryFile", unwritable)
    train = torch.randn(20, 3)
    snap = Snapshot({}, {"train": train, "validation": None})
    kept = train.clone()
    train.zero_()
    torch.testing.assert_close(snap["train"], kept, rtol=0, atol=0)
    assert snap["validation"] is None
    assert "No space left on device" in caplog.text and "TMPDIR" in caplog.text
