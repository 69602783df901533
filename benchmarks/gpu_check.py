"""GPU check: trains and maps a simulated in-memory set on CUDA and compares it with the CPU.

Needs only torch and numpy (scipy is used for the PCA start when present). Run from the repository
root without installing:  python benchmarks/gpu_check.py  [--cells 20000 --genes 2000]
Prints one JSON object: the first losses on both devices and their largest relative difference,
mapping agreement, cells/s per batch size on GPU and CPU (fp32 and bf16-mixed on the GPU), and
the peak GPU memory. ``--compile`` adds cells/s with the step's dense part compiled (``train --compile``;
Triton on the GPU) at the first batch size, on both devices, next to the eager numbers. Without CUDA it
runs the CPU half (a smoke test) and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atlasdgd  # noqa: E402,F401  (before torch: OpenMP's wait policy)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from atlasdgd.data.source import LoadsBatches  # noqa: E402
from atlasdgd.infer.mapping import MappingOptions, map_cells  # noqa: E402
from atlasdgd.model.config import ModelConfig  # noqa: E402
from atlasdgd.model.module import DGDModule  # noqa: E402
from atlasdgd.optim.row_adam import RepresentationTable  # noqa: E402
from atlasdgd.train.config import TrainConfig  # noqa: E402
from atlasdgd.train.run import run_training  # noqa: E402
from atlasdgd.train.trainer import Trainer  # noqa: E402


class Csr:
    """Rows of a CSR matrix as numpy arrays (no scipy needed)."""

    def __init__(self, indptr, indices, data):
        self.indptr, self.indices, self.data = indptr, indices, data

    def rows(self, rows: np.ndarray) -> "Csr":
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        flat = first + np.arange(int(lengths.sum()))
        return Csr(np.concatenate([[0], np.cumsum(lengths)]), self.indices[flat], self.data[flat])


class SimulatedCells(LoadsBatches):
    """An in-memory cell source (the CellSource protocol) from a small NB simulation: cell types,
    batches with multiplicative effects, log-normal library sizes."""

    chunk_cells = 1024

    def __init__(self, n_cells: int, n_genes: int, n_types: int = 6, n_batches: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.types = rng.integers(0, n_types, n_cells)
        self.batches = rng.integers(0, n_batches, n_cells)
        base = rng.gamma(0.6, 1.0, (n_types, n_genes))
        effect = np.exp(rng.normal(0, 0.3, (n_batches, n_genes)))
        library = np.exp(rng.normal(np.log(2000), 0.3, n_cells))
        indptr, indices, data = [0], [], []
        for start in range(0, n_cells, 4096):
            sl = slice(start, min(n_cells, start + 4096))
            frac = base[self.types[sl]] * effect[self.batches[sl]]
            frac /= frac.sum(1, keepdims=True)
            counts = rng.negative_binomial(2.0, 2.0 / (2.0 + frac * library[sl, None])).astype(np.float32)
            nz = counts != 0
            indptr.extend((indptr[-1] + np.cumsum(nz.sum(1))).tolist())
            indices.append(np.nonzero(nz)[1])
            data.append(counts[nz])
        self.csr = Csr(np.asarray(indptr, dtype=np.int64), np.concatenate(indices), np.concatenate(data))
        self.n_cells, self.modalities, self.label_key = n_cells, ["rna"], "cell_type"
        self.n_genes = n_genes
        self.observed = {"rna": np.ones(n_cells, dtype=bool)}
        self._library = np.add.reduceat(self.csr.data, self.csr.indptr[:-1]).astype(np.float32)
        self._library[np.diff(self.csr.indptr) == 0] = 0
        self.split = rng.choice(np.array(["train", "validation", "test"]), n_cells, p=[0.8, 0.1, 0.1])

    def n_features(self, modality: str) -> int:
        return self.n_genes

    def library(self, modality: str) -> np.ndarray:
        return self._library

    def covariate_codes(self) -> np.ndarray:
        return self.batches[:, None].astype(np.int64)

    def label_codes(self) -> np.ndarray:
        return self.types.astype(np.int64)

    def split_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def read_rows(self, modality: str, rows: np.ndarray) -> Csr:
        return self.csr.rows(np.asarray(rows, dtype=np.int64))


def config(cells: SimulatedCells) -> ModelConfig:
    return ModelConfig(modalities={"rna": cells.n_genes}, latent_dim=10, n_components=6, covariates={"batch": 2})


def train_and_map(cells: SimulatedCells, device: str, epochs: int, init: str) -> dict:
    torch.manual_seed(0)
    module = DGDModule(config(cells), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(max_epochs=epochs, min_epochs=epochs, heldout_epochs=2, init=init, seed=0)
    t0 = time.perf_counter()
    result = run_training(module, cells, cfg, label_codes=cells.label_codes(), n_labels=6, device=device,
                          progress=False)
    seconds = time.perf_counter() - t0
    test = cells.split_rows("test")[:512]
    mapping = map_cells(module, cells, MappingOptions(epochs=3, seed=0), rows=test)
    return {"losses": [row["train_loss"] for row in result.history], "seconds": seconds,
            "mapped": mapping.values, "mapped_loss": float(mapping.loss.mean()),
            "device_of_module": str(next(module.parameters()).device)}


def throughput(cells: SimulatedCells, device: str, batch_size: int, precision: str = "32",
               compile_step: bool = False) -> float:
    """Training cells/s over one epoch of the training cells (after one warm-up epoch, which holds the
    one compile with ``compile_step``)."""
    torch.manual_seed(0)
    module = DGDModule(config(cells), generator=torch.Generator().manual_seed(0)).to(device)
    module.autocast_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    rows = cells.split_rows("train")
    table = RepresentationTable(torch.zeros(len(rows), module.config.representation_dim), device=device)
    trainer = Trainer(module, TrainConfig(batch_size=batch_size, compile=compile_step), table)
    loader = cells.loader(rows, batch_size, seed=0, device=device, count_summaries=True)
    trainer.train_epoch(loader)  # warm-up: allocator, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loader.set_epoch(1)
    trainer.train_epoch(loader)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(rows) / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the CPU/GPU agreement run")
    parser.add_argument("--batch-sizes", default="128,512,1024,4096")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled step at the first batch size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    try:
        import scipy  # noqa: F401

        init = "pca"
    except ImportError:
        init = "zero"
    cells = SimulatedCells(args.cells, args.genes)
    out: dict = {"torch": torch.__version__, "cuda": has_cuda, "cells": args.cells, "genes": args.genes,
                 "cpu_threads": torch.get_num_threads(), "init": init}
    if has_cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
    agreement = cells if args.cells <= 20_000 else SimulatedCells(20_000, args.genes)
    cpu = train_and_map(agreement, "cpu", args.epochs, init)
    out["cpu_losses"] = cpu["losses"]
    if has_cuda:
        torch.cuda.reset_peak_memory_stats()
        gpu = train_and_map(agreement, "cuda", args.epochs, init)
        out["gpu_losses"] = gpu["losses"]
        out["gpu_module_device"] = gpu["device_of_module"]
        out["max_rel_loss_difference"] = float(np.max(np.abs(np.array(gpu["losses"]) - cpu["losses"])
                                                      / np.abs(cpu["losses"])))
        out["mapping_max_abs_difference"] = float(np.abs(gpu["mapped"] - cpu["mapped"]).max())
        out["mapped_loss_cpu_gpu"] = [cpu["mapped_loss"], gpu["mapped_loss"]]
        out["losses_agree"] = out["max_rel_loss_difference"] < 1e-3
        out["train_seconds_cpu_gpu"] = [cpu["seconds"], gpu["seconds"]]
    out["cells_per_s"] = {}
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    for b in sizes:
        row = {"cpu": throughput(cells, "cpu", b)}
        if args.compile and b == sizes[0]:
            row["cpu_compiled"] = throughput(cells, "cpu", b, compile_step=True)
        if has_cuda:
            row["cuda"] = throughput(cells, "cuda", b)
            row["cuda_bf16_mixed"] = throughput(cells, "cuda", b, "bf16-mixed")
            if args.compile and b == sizes[0]:
                row["cuda_compiled"] = throughput(cells, "cuda", b, compile_step=True)
        out["cells_per_s"][str(b)] = row
        print(json.dumps({"batch_size": b, **row}), file=sys.stderr, flush=True)
    if has_cuda:
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
