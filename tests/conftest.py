import os
import warnings
from pathlib import Path

import pytest

import atlasdgd  # noqa: F401  (before torch: it sets OpenMP's wait policy, which torch's import fixes)
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=FutureWarning)

DATA_DIR = Path(os.environ.get("ATLASDGD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shared_data(name: str) -> Path:
    """Path of a shared real data set; skips the test (saying why) when it is absent."""
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"shared data set {name} not found in {DATA_DIR} (set ATLASDGD_DATA)")
    return path


@pytest.fixture(scope="session")
def mapped_atlas(tmp_path_factory):
    """A small RNA+ATAC model trained on batches 0-2 of a simulation; batch 3 is held back.

    Returns a namespace: ``data`` (all cells, MuData), ``train``/``heldout`` (MuData), ``model_dir``.
    Tests that change a model load their own copy from ``model_dir``.
    """
    from types import SimpleNamespace

    import atlasdgd
    from atlasdgd.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(n_cells=2400, n_types=5, n_batches=4, n_genes=400, n_peaks=800, batch_effect=0.8,
                           n_linked_genes=10, peaks_per_linked_gene=6, seed=3)
    data = simulate(cfg)
    held = (data.obs["batch"] == "batch_3").to_numpy()
    train, heldout = data[~held].copy(), data[held].copy()
    torch.manual_seed(0)
    model = atlasdgd.DGD(train, label_key="cell_type", covariate_keys=["batch"], seed=0)
    model.train(max_epochs=40, min_epochs=40, progress=False)
    model_dir = tmp_path_factory.mktemp("mapped_atlas") / "model"
    model.save(model_dir)
    return SimpleNamespace(data=data, train=train, heldout=heldout, model_dir=model_dir, config=cfg)


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto) on loopback, started and stopped here."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "test", "secret": "test", "endpoint_url": f"http://127.0.0.1:{port}"}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("atlas-bucket")
    yield options
    server.stop()
