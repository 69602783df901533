"""What data-parallel workers exchange: dense gradients and a few sums, never representation rows.

Each worker owns the representation rows of its cells (a row gets gradient only from its own cell),
so only the decoder, dispersions and mixtures need their gradients summed. With the loss of every
worker divided by the global batch size (and the per-step hyper-prior by the number of workers), the
summed gradient is exactly the gradient one process would compute on the union of the batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _comm_device() -> torch.device:
    """Where tensors must live for the process group's collectives (NCCL: the worker's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over workers (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def allreduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over workers in one flat all-reduce (missing grads count as 0)."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every worker's copy of ``module`` equal to worker ``src``'s (as DDP does at start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src)
