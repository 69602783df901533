"""Ray Train: 2 workers match one process; a SIGKILLed worker is recovered from checkpoints.

Each TorchTrainer.fit costs ~20 s here, so Ray starts once per session and these tests are few.
"""

import os
from pathlib import Path
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import atlasdgd
from atlasdgd.train.checkpoint import MANIFEST
from atlasdgd.simulate import SimulationConfig, write_simulation_store
from conftest import free_port

ray = pytest.importorskip("ray")

TRAIN = {"max_epochs": 12, "min_epochs": 12, "heldout_epochs": 5}


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = tmp_path_factory.mktemp("ray") / "sim.zarr"
    write_simulation_store(SimulationConfig(n_cells=3000, n_types=4, n_batches=2, n_genes=300, batch_effect=0.8, seed=4),
                           str(uri), progress=False)
    return uri


@pytest.fixture(scope="module")
def single(store):
    model = atlasdgd.DGD(str(store), seed=0)
    model.train(progress=False, **TRAIN)
    return model


def test_a_second_ray_node_carries_a_worker(store, tmp_path):
    """Two nodes of one CPU each on this machine: two 1-CPU workers must use both. Runs before the
    in-process Ray session starts (``ray stop`` ends every Ray process on the machine)."""
    import json
    import sys

    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    # a local multi-node cluster without token authentication (nodes would need a shared token)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
    common = ["--disable-usage-stats"]
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--resources", json.dumps({"node_a": 1}), *common], check=True, env=env, capture_output=True)
    try:
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        "--resources", json.dumps({"node_b": 1}), *common], check=True, env=env, capture_output=True)
        out = tmp_path / "model"
        res = subprocess.run([sys.executable, "-m", "atlasdgd.cli", "train", str(store), "--out", str(out), "--workers", "2",
                              "--threads", "1", "--address", f"127.0.0.1:{port}", "--epochs", "2", "--min-epochs", "1",
                              "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        model = atlasdgd.DGD.load(out)
        assert model.cells.n_obs == 3000
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def _quality(model):
    cells = model.embed()
    train = (cells.obs["dgd_split"] == "train").to_numpy()
    ari = adjusted_rand_score(cells.obs["cell_type"][train], cells.obs["dgd_cluster"][train])
    return ari, float(model.history["val_recon"].iloc[-1])


def test_two_ray_workers_train_as_well_as_one_process(ray_session, store, single, tmp_path):
    from atlasdgd.distributed.ray_train import train_on_ray

    out = tmp_path / "model"
    history = train_on_ray(str(store), str(out), workers=2, train_options=TRAIN, progress=False, threads=1)
    assert list(history["epoch"]) == list(range(12))
    model = atlasdgd.DGD.load(out)
    assert model.cells.n_obs == 3000 and np.isfinite(model.representation).all()
    ari_ray, val_ray = _quality(model)
    ari_one, val_one = _quality(single)
    assert ari_ray > 0.9 and abs(ari_ray - ari_one) < 0.05
    assert abs(val_ray - val_one) / val_one < 0.02
    assert not (out / "checkpoints").exists()


def test_a_killed_worker_is_replaced_and_the_run_completes(ray_session, store, single, tmp_path):
    from atlasdgd.distributed.ray_train import train_on_ray

    out = tmp_path / "model"
    result = {}

    def run():
        try:
            result["history"] = train_on_ray(str(store), str(out), workers=2, train_options=TRAIN, progress=False,
                                             threads=1, max_failures=2, checkpoint_every=1)
        except Exception as e:  # surfaced below
            result["error"] = e

    driver = threading.Thread(target=run)
    driver.start()
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None:
        if list((out / "checkpoints").glob(f"epoch-00000[3-9]/{MANIFEST}")):
            pids = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                killed = int(pids[-1])
                os.kill(killed, signal.SIGKILL)  # mid-run, while it trains an epoch
        time.sleep(0.05)
    driver.join(timeout=400)
    assert killed is not None, "no worker to kill"
    assert "error" not in result, result.get("error")
    model = atlasdgd.DGD.load(out)
    assert list(model.history["epoch"]) == list(range(12))
    # every row was trained: none is still at its start position
    start = atlasdgd.DGD(str(store), seed=0)
    from atlasdgd.train.run import initial_representations

    init = initial_representations(start.module, start.data, start.train_config, start.data.split_rows("train"))
    moved = np.abs(model.representation - init).max(axis=1)
    assert (moved > 0).all()
    ari_ray, val_ray = _quality(model)
    ari_one, val_one = _quality(single)
    assert abs(val_ray - val_one) / val_one < 0.02 and ari_ray > 0.9

