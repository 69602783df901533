"""Data-parallel training: two gloo workers equal one process on the union of their batches."""

import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import free_port

WORKER = r'''
import math, os, sys, numpy as np, torch, torch.distributed as dist
from safetensors.torch import save_file
torch.set_num_threads(1)
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
from atlasdgd.data.adapters import prepare
from atlasdgd.data.loader import CellLoader
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.simulate import SimulationConfig, simulate
from atlasdgd.data.plan import BlockShufflePlan, shard_rows
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.trainer import Trainer

B, CHUNK, BUFFER, WORKERS = 32, 50, 2, 2
data = prepare(simulate(SimulationConfig(n_cells=700, n_types=3, n_batches=2, n_genes=60, seed=8)),
               label_key="cell_type", covariate_keys=["batch"])
rows = data.split_rows("train")
cfg = ModelConfig(modalities={"rna": 60}, latent_dim=4, n_components=3, covariates={"batch": 2})
torch.manual_seed(0)  # same decoder initialisation in every process
module = DGDModule(cfg, generator=torch.Generator().manual_seed(0))
init = torch.from_numpy(np.random.default_rng(0).normal(size=(len(rows), cfg.representation_dim)).astype(np.float32))
n_steps = math.ceil(math.ceil(len(rows) / WORKERS) / B)
shards = [shard_rows(rows, r, WORKERS) for r in range(WORKERS)]
offsets = np.cumsum([0] + [len(s) for s in shards])
plans = [BlockShufflePlan(len(s), B, CHUNK, BUFFER, seed=5, rank=r, n_steps=n_steps) for r, s in enumerate(shards)]
tc = TrainConfig(hyperprior="dataset", l1=0.01)
if world > 1:   # this worker: its shard, its plan
    table = RepresentationTable(init[offsets[rank]:offsets[rank + 1]])
    loader = CellLoader(data, rows, B, seed=5, rank=rank, world_size=WORKERS, chunk_cells=CHUNK, buffer_chunks=BUFFER)
else:           # one process, each step the union of the workers' batches
    table = RepresentationTable(init)
    whole = CellLoader(data, rows, B)
    loader = [whole.batch(np.concatenate([offsets[r] + plans[r].batches(0)[k] for r in range(WORKERS)]))
              for k in range(n_steps)]
trainer = Trainer(module, tc, table, n_train_total=len(rows))
stats = trainer.train_epoch(loader)
state = {k: v.contiguous() for k, v in module.state_dict().items()}
state["table"] = table.values
save_file(state, f"{out}/rank{rank}_of{world}.safetensors", metadata={"train_loss": str(stats["train_loss"])})
if world > 1:
    dist.destroy_process_group()
# gloo's threads still abort a worker now and then at interpreter exit ("terminate called without an
# active exception", SIGABRT after its results were written): leave without running C++ static destructors
os._exit(0)
'''


def _run(world: int, out) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), str(port), str(out)])
             for r in range(world)]
    for p in procs:
        assert p.wait(timeout=120) == 0


def test_two_gloo_workers_reach_the_parameters_of_one_process(tmp_path):
    _run(1, tmp_path)
    _run(2, tmp_path)
    one = load_file(str(tmp_path / "rank0_of1.safetensors"))
    workers = [load_file(str(tmp_path / f"rank{r}_of2.safetensors")) for r in range(2)]
    for name, value in one.items():
        if name == "table":
            continue
        torch.testing.assert_close(workers[0][name], workers[1][name], rtol=0, atol=0)  # replicas agree exactly
        torch.testing.assert_close(workers[0][name], value, rtol=1e-5, atol=1e-6)
    rows = torch.cat([workers[0]["table"], workers[1]["table"]])
    torch.testing.assert_close(rows, one["table"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(one["table"], torch.from_numpy(np.random.default_rng(0).normal(size=one["table"].shape).astype(np.float32)))


class _FakeRay:
    """Records ray.init calls; ``running`` says whether a cluster answers at address="auto"."""

    def __init__(self, running: bool, initialized: bool = False):
        self.running, self.initialized, self.calls = running, initialized, []

    def is_initialized(self):
        return self.initialized

    def init(self, address=None, **kwargs):
        self.calls.append((address, "num_cpus" in kwargs))
        if address == "auto" and not self.running:
            raise ConnectionError("Could not find any running Ray instance")
        self.initialized = True


def test_ray_joins_a_running_cluster_else_starts_one_and_leaves_the_callers_alone():
    from atlasdgd.distributed.ray_train import _connect

    joined = _FakeRay(running=True)
    assert _connect(joined, None, 2, False) is True
    assert joined.calls == [("auto", False)]  # joined: never a second cluster with its own CPU count
    started = _FakeRay(running=False)
    assert _connect(started, None, 2, False) is True
    assert started.calls == [("auto", False), (None, True)]
    callers = _FakeRay(running=True, initialized=True)
    assert _connect(callers, None, 2, False) is False and callers.calls == []  # not ours to shut down
    remote = _FakeRay(running=False)
    assert _connect(remote, "ray://head:10001", 2, False) is True and remote.calls == [("ray://head:10001", False)]
