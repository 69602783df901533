"""Checkpoints: a resumed run equals an uninterrupted one; torn checkpoints are never loaded."""

import signal
import subprocess
import sys
import time

import pytest
import torch

import atlasdgd
from atlasdgd.cli import main
from atlasdgd.train.checkpoint import MANIFEST, Checkpoints
from atlasdgd.simulate import SimulationConfig, simulate, write_simulation_store

OPTIONS = dict(max_epochs=6, min_epochs=6, heldout_epochs=2, progress=False)


@pytest.fixture(scope="module")
def data():
    return simulate(SimulationConfig(n_cells=800, n_types=3, n_batches=2, n_genes=80, seed=6))


def _model(data):
    return atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"], latent_dim=4, seed=0)


class Interrupt(Exception):
    pass


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(data, tmp_path):
    whole = _model(data)
    whole.train(**OPTIONS)

    def die_at_4(row):
        if row["epoch"] == 4:
            raise Interrupt

    first = _model(data)
    with pytest.raises(Interrupt):
        first.train(checkpoint_uri=str(tmp_path / "m"), checkpoint_every=1, on_epoch=die_at_4, **OPTIONS)
    ckpt = Checkpoints(str(tmp_path / "m"))
    assert [p.rsplit("-", 1)[-1] for p in ckpt.complete()] == ["000002", "000003"]  # the last two are kept

    resumed = _model(data)
    history = resumed.train(checkpoint_uri=str(tmp_path / "m"), resume=True, **OPTIONS)
    assert list(history["epoch"]) == list(range(6))
    for name, value in whole.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(resumed.representation), torch.from_numpy(whole.representation),
                               rtol=0, atol=0)


def test_a_torn_checkpoint_is_never_loaded(data, tmp_path):
    model = _model(data)
    model.train(checkpoint_uri=str(tmp_path / "m"), checkpoint_every=1, **{**OPTIONS, "max_epochs": 3, "min_epochs": 3})
    ckpt = Checkpoints(str(tmp_path / "m"))
    latest = ckpt.latest()
    assert latest.endswith("epoch-000002")
    (tmp_path / "m" / "checkpoints" / "epoch-000002" / MANIFEST).unlink()  # killed while writing epoch 2
    assert ckpt.latest().endswith("epoch-000001")
    again = _model(data)
    history = again.train(checkpoint_uri=str(tmp_path / "m"), resume=True, **{**OPTIONS, "max_epochs": 3, "min_epochs": 3})
    assert list(history["epoch"]) == [0, 1, 2]  # epochs 0-1 from the checkpoint, epoch 2 trained again


def test_killing_the_driver_and_resuming_from_the_command_line(tmp_path, capsys):
    store = tmp_path / "sim.zarr"
    write_simulation_store(SimulationConfig(n_cells=3000, n_types=3, n_batches=2, n_genes=300, seed=2), str(store),
                           progress=False)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "atlasdgd.cli", "train", str(store), "--out", str(out), "--epochs", "8",
           "--min-epochs", "8", "--checkpoint-every", "1", "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob(f"epoch-000002/{MANIFEST}")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "atlasdgd.json").exists()  # no model yet: only checkpoints
    with pytest.raises(atlasdgd.errors.ModelFileError, match="not a complete atlasdgd model"):
        atlasdgd.DGD.load(out)
    assert main(cmd[3:]) == 2  # refuses to start over silently
    assert "--resume" in capsys.readouterr().err
    assert main([*cmd[3:], "--resume"]) == 0
    model = atlasdgd.DGD.load(out)
    assert list(model.history["epoch"]) == list(range(8))
    assert not (out / "checkpoints").exists()  # a complete model replaces its checkpoints


def test_the_default_schedule_is_by_wall_time_and_best_snapshots_are_written_once(data, tmp_path, monkeypatch):
    # default: a checkpoint once the interval has passed (not every epoch); the best-so-far snapshot is
    # written once per best epoch and shared by the checkpoints taken while it stays the best
    from atlasdgd.train import checkpoint as ckpt_module

    clock = {"now": 0.0}
    monkeypatch.setattr(ckpt_module.time, "monotonic", lambda: clock["now"])
    written = []
    real_save = Checkpoints.save

    def counting_save(self, epoch, *args, **kwargs):
        written.append(epoch)
        return real_save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", counting_save)

    def tick(row):  # each epoch "takes" 100 s of wall time
        clock["now"] += 100.0

    model = _model(data)
    model.train(checkpoint_uri=str(tmp_path / "m"), checkpoint_seconds=250.0, on_epoch=tick, **OPTIONS)
    assert written == [2, 5]  # 300 s and 600 s: every third epoch, not six checkpoints
    root = tmp_path / "m" / "checkpoints"
    kept = sorted(p.name for p in root.iterdir())
    states = {p.name: __import__("json").loads((root / p.name / "state.json").read_text())
              for p in root.iterdir() if p.name.startswith("epoch-")}
    referenced = {s["best"] for s in states.values()}
    assert {k for k in kept if k.startswith("best-")} == referenced  # unreferenced snapshots pruned
    for name, state in states.items():
        assert state["best"] == f"best-{state['stopper']['best_epoch']:06d}"


def test_a_resumed_run_with_a_shared_best_snapshot_ends_where_an_uninterrupted_one_does(data, tmp_path):
    whole = _model(data)
    whole.train(**{**OPTIONS, "patience": 1, "min_epochs": 1})

    def die_at_4(row):
        if row["epoch"] == 4:
            raise Interrupt

    first = _model(data)
    with pytest.raises(Interrupt):
        first.train(checkpoint_uri=str(tmp_path / "m"), checkpoint_every=1, on_epoch=die_at_4,
                    **{**OPTIONS, "patience": 1, "min_epochs": 1})
    resumed = _model(data)
    history = resumed.train(checkpoint_uri=str(tmp_path / "m"), checkpoint_every=1, resume=True,
                            **{**OPTIONS, "patience": 1, "min_epochs": 1})
    assert list(history["epoch"]) == list(whole.history["epoch"])
    torch.testing.assert_close(torch.from_numpy(resumed.representation), torch.from_numpy(whole.representation),
                               rtol=0, atol=0)
