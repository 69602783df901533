"""Training checkpoints at any fsspec URI; complete only when their manifest is written.

    MODEL_URI/checkpoints/epoch-000012/
      shard-0.safetensors ...   per worker: its cells' rows (global ids), values and Adam moments for
                                the train and validation tables
      dense.safetensors         decoder, dispersions, mixtures, optimizer moments
      state.json                epoch, history, early-stopping state, optimizer settings, world size,
                                and which best-so-far snapshot goes with it
      checkpoint.json           manifest (format, version, epoch, world size), written last by worker 0
                                after every shard is written
    MODEL_URI/checkpoints/best-000009/
      shard-0.safetensors ...   the best epoch's representation values, per worker
      dense.safetensors         the best epoch's weights
      complete                  written last

Only what changed is written: the best-so-far snapshot is written once per best epoch and shared by
every checkpoint taken while it stays the best. When to write is a :class:`CheckpointSchedule`: by
default by wall time (every 5 minutes), so a small data set trained for hundreds of short epochs
does not write hundreds of checkpoints.

What is saved is exactly the trainer's ``state_dict()`` (module, optimisers, representation tables)
and the early-stopping state, all moved to the host: a checkpoint written on a GPU resumes on a CPU.

Workers write their shards in place and meet at a barrier; worker 0 then writes the dense state and
the manifest. A checkpoint without a manifest (a job killed while writing) is never loaded. Loading
reads every shard and keeps the rows a worker owns now, so a job may resume with another number of
workers. The data order needs no RNG state: it is a function of (seed, epoch, rank).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from atlasdgd.errors import ModelFileError
from atlasdgd.io.manifest import ManifestKind, read_manifest
from atlasdgd.io.uri import filesystem as _filesystem
from atlasdgd.runtime import sync

MANIFEST = "checkpoint.json"
FORMAT, VERSION = "atlasdgd-checkpoint", 1
CHECKPOINT_MANIFEST = ManifestKind(MANIFEST, FORMAT, VERSION, "atlasdgd checkpoint", ModelFileError,
                                   incomplete="a job killed while writing it; it is never resumed from",
                                   outdated="upgrade atlasdgd, or train afresh without --resume")
KEEP = 2  # complete checkpoints kept
TABLE_KEYS = ("values", "exp_avg", "exp_avg_sq", "steps")


DEFAULT_CHECKPOINT_SECONDS = 300.0


class CheckpointSchedule:
    """When to write a checkpoint: every ``every`` epochs, or (``every`` None) once ``seconds`` of
    wall time have passed since the last one. Workers agree: the wall-time vote is summed over them
    (one small all-reduce per epoch), so all write at the same epoch."""

    def __init__(self, every: int | None = None, seconds: float = DEFAULT_CHECKPOINT_SECONDS):
        from atlasdgd.errors import AtlasDGDError

        if every is not None and every < 1:
            raise AtlasDGDError(f"checkpoint_every must be >= 1 epochs (or None: by wall time), got {every}")
        if not seconds >= 0:
            raise AtlasDGDError(f"checkpoint_seconds must be >= 0, got {seconds}")
        self.every, self.seconds = every, float(seconds)
        self._last = time.monotonic()

    def due(self, epoch: int) -> bool:
        if self.every is not None:
            return (epoch + 1) % self.every == 0
        vote = int(time.monotonic() - self._last >= self.seconds)
        return (sync.all_reduce_sum([vote])[0] if sync.world_size() > 1 else vote) > 0

    def written(self) -> None:
        self._last = time.monotonic()


def filesystem(uri: str, storage_options: dict | None):
    return _filesystem(uri, storage_options, error=ModelFileError)


def _save_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _optimizer_tensors(optimizer_states: list[dict]) -> tuple[dict[str, torch.Tensor], list]:
    tensors, groups = {}, []
    for i, sd in enumerate(optimizer_states):
        groups.append(sd["param_groups"])
        for pid, state in sd["state"].items():
            for key, value in state.items():
                tensors[f"opt{i}.{pid}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors, groups


def _optimizer_states(tensors: dict[str, torch.Tensor], groups: list) -> list[dict]:
    states = []
    for i, param_groups in enumerate(groups):
        state: dict = {}
        for name, value in tensors.items():
            prefix, pid, key = name.split(".", 2)
            if prefix == f"opt{i}":
                state.setdefault(int(pid), {})[key] = value
        states.append({"state": state, "param_groups": param_groups})
    return states


class Checkpoints:
    def __init__(self, model_uri: str, storage_options: dict | None = None):
        self.fs, root = filesystem(model_uri, storage_options)
        self.root = f"{root.rstrip('/')}/checkpoints"

    def clear(self) -> None:
        """Remove every checkpoint (a fresh run must not resume a stale one); worker 0 only."""
        if sync.rank() == 0 and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        sync.barrier()

    def _dir(self, epoch: int) -> str:
        return f"{self.root}/epoch-{epoch:06d}"

    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not self.fs.exists(self.root):
            return []
        dirs = sorted(p for p in self.fs.ls(self.root, detail=False) if p.rstrip("/").split("/")[-1].startswith("epoch-"))
        return [d for d in dirs if self.fs.exists(f"{d}/{MANIFEST}")]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def _best_dir(self, epoch: int) -> str:
        return f"{self.root}/best-{epoch:06d}"

    def _write_best(self, best_epoch: int, best: dict, rows: dict[str, np.ndarray]) -> str:
        """The best-so-far snapshot, written once per best epoch (every worker calls this)."""
        d = self._best_dir(best_epoch)
        if self.fs.exists(f"{d}/complete"):  # already written by an earlier checkpoint: unchanged
            return d.rsplit("/", 1)[-1]
        shard = {}
        for split in ("train", "validation"):
            if best.get(split) is not None:
                shard[f"{split}.rows"] = torch.from_numpy(np.asarray(rows[split], dtype=np.int64))
                shard[f"{split}.best"] = best[split]
        self.fs.makedirs(d, exist_ok=True)
        self.fs.pipe_file(f"{d}/shard-{sync.rank()}.safetensors", _save_bytes(shard))
        sync.barrier()
        if sync.rank() == 0:
            self.fs.pipe_file(f"{d}/dense.safetensors", _save_bytes(dict(best["module"])))
            self.fs.pipe_file(f"{d}/complete", b"")
        return d.rsplit("/", 1)[-1]

    def save(self, epoch: int, trainer, rows: dict[str, np.ndarray], state: dict, best: dict | None,
             best_epoch: int | None = None) -> None:
        """Every worker calls this at the same point; ``rows`` are the global cell ids of its tables;
        ``best`` is the best-so-far snapshot, of epoch ``best_epoch``."""
        rank, world = sync.rank(), sync.world_size()
        d = self._dir(epoch)
        full = trainer.state_dict()
        best_name = None
        if best is not None and best.get("module") is not None:
            best_name = self._write_best(epoch if best_epoch is None else best_epoch, best, rows)
        shard = {}
        for split in ("train", "validation"):
            if full[split] is None:
                continue
            shard[f"{split}.rows"] = torch.from_numpy(np.asarray(rows[split], dtype=np.int64))
            shard.update({f"{split}.{k}": full[split][k] for k in TABLE_KEYS})
        self.fs.makedirs(d, exist_ok=True)
        self.fs.pipe_file(f"{d}/shard-{rank}.safetensors", _save_bytes(shard))
        sync.barrier()
        if rank == 0:
            dense = {f"module.{k}": v for k, v in full["module"].items()}
            opt_tensors, groups = _optimizer_tensors(full["optimizers"])
            dense.update(opt_tensors)
            self.fs.pipe_file(f"{d}/dense.safetensors", _save_bytes(dense))
            self.fs.pipe_file(f"{d}/state.json", json.dumps({**state, "optimizer_groups": groups, "world_size": world,
                                                             "epoch": epoch, "best": best_name}).encode())
            from atlasdgd import __version__

            manifest = {"format": FORMAT, "format_version": VERSION, "atlasdgd_version": __version__, "epoch": epoch,
                        "world_size": world}
            self.fs.pipe_file(f"{d}/{MANIFEST}", json.dumps(manifest).encode())
            self._prune()
        sync.barrier()

    def _prune(self) -> None:
        """Keep the last KEEP complete checkpoints and the best snapshots they refer to."""
        done = self.complete()
        for old in done[:-KEEP]:
            self.fs.rm(old, recursive=True)
        wanted = {json.loads(self.fs.cat_file(f"{d}/state.json")).get("best") for d in done[-KEEP:]}
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").split("/")[-1]
            if name.startswith("best-") and name not in wanted:
                self.fs.rm(path, recursive=True)

    def load(self, path: str, trainer, rows: dict[str, np.ndarray]) -> tuple[dict, dict | None]:
        """Restore the trainer's state with this worker's rows; returns (state, best-so-far snapshot or None)."""
        if "format" not in json.loads(self.fs.cat_file(f"{path}/{MANIFEST}")):
            raise ModelFileError(f"{path!r} was written by an older atlasdgd whose checkpoints this one cannot resume: "
                                 "train afresh without --resume (or --overwrite)")
        read_manifest(self.fs, path, CHECKPOINT_MANIFEST)
        state = json.loads(self.fs.cat_file(f"{path}/state.json"))
        dense = _load_bytes(self.fs.cat_file(f"{path}/dense.safetensors"))
        full = {
            "module": {k[7:]: v for k, v in dense.items() if k.startswith("module.")},
            "optimizers": _optimizer_states({k: v for k, v in dense.items() if k.startswith("opt")},
                                            state["optimizer_groups"]),
        }
        shards = [_load_bytes(self.fs.cat_file(f"{path}/shard-{r}.safetensors")) for r in range(state["world_size"])]
        best_module = {}
        if state.get("best"):  # the snapshot written apart (only when it changed)
            best_path = f"{self.root}/{state['best']}"
            best_module = _load_bytes(self.fs.cat_file(f"{best_path}/dense.safetensors"))
            best_shards = [_load_bytes(self.fs.cat_file(f"{best_path}/shard-{r}.safetensors"))
                           for r in range(state["world_size"])]
            for shard, extra in zip(shards, best_shards):
                shard.update({k: v for k, v in extra.items() if k.endswith(".best")})
        else:  # written by atlasdgd <= 0.x with the snapshot inside each checkpoint
            best_module = {k[5:]: v for k, v in dense.items() if k.startswith("best.")}
        best = {"module": best_module or None}
        for split, table in (("train", trainer.train_table), ("validation", trainer.val_table)):
            if table is None:
                full[split] = None
                continue
            merged = {key: torch.cat([s[f"{split}.{key}"] for s in shards]) for key in ("rows", *TABLE_KEYS)}
            pos = {int(r): i for i, r in enumerate(merged["rows"].numpy())}
            mine = torch.as_tensor([pos[int(r)] for r in rows[split]], dtype=torch.long)
            full[split] = {key: merged[key][mine] for key in TABLE_KEYS}
            if all(f"{split}.best" in s for s in shards):
                best[split] = torch.cat([s[f"{split}.best"] for s in shards])[mine].to(table.device)
        trainer.load_state_dict(full)
        if best["module"] is not None:
            device = trainer.train_table.device
            best["module"] = {k: v.to(device) for k, v in best["module"].items()}
        return state, (best if best["module"] is not None else None)


def write_final_rows(model_uri: str, storage_options: dict | None, rows: np.ndarray, values: np.ndarray) -> None:
    """Each worker's final representations (all splits), for worker 0 to assemble the model."""
    fs, root = filesystem(model_uri, storage_options)
    d = f"{root.rstrip('/')}/checkpoints/final"
    fs.makedirs(d, exist_ok=True)
    fs.pipe_file(f"{d}/rows-{sync.rank()}.safetensors",
                 _save_bytes({"rows": torch.from_numpy(np.asarray(rows, np.int64)), "values": torch.from_numpy(values)}))
    sync.barrier()


def read_final_rows(model_uri: str, storage_options: dict | None, n_cells: int, dim: int) -> np.ndarray:
    fs, root = filesystem(model_uri, storage_options)
    d = f"{root.rstrip('/')}/checkpoints/final"
    out = np.zeros((n_cells, dim), dtype=np.float32)
    for r in range(sync.world_size()):
        part = _load_bytes(fs.cat_file(f"{d}/rows-{r}.safetensors"))
        out[part["rows"].numpy()] = part["values"].numpy()
    return out

