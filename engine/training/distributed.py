"""Data-parallel training over ``torch.distributed`` (one process per worker or GPU, as
``torchrun`` starts them); a single process when no process group is set up.

:func:`engine.training.train` calls these itself: every rank starts from rank 0's weights, draws
its own samples, and averages its gradients with the others' before each optimizer step, so all
ranks keep the same weights; rank 0 alone writes checkpoints. The decoder runs many times per
step on different prompts, so gradients are averaged by hand after ``backward()`` (one flattened
all-reduce per step) rather than through ``DistributedDataParallel``'s forward hooks.

    torchrun --nproc-per-node 2 -m flows.cli train --root ROOT --steps 2000
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "average_gradients",
    "broadcast_parameters",
    "init_from_env",
    "leave_process_group",
    "mean_across_ranks",
    "rank_and_world",
    "rank_zero_decides",
]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1) and
    return this rank's device: ``cuda:LOCAL_RANK`` with GPUs (NCCL), else the CPU (Gloo).
    Without ``WORLD_SIZE`` (or with 1) nothing is set up."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device or torch.device("cpu")


def leave_process_group() -> None:
    """Tear down the process group after the last collective (no-op without one). A rank that
    exits with Gloo's threads still running can abort (SIGABRT, "terminate called without an
    active exception"), which fails the whole ``torchrun`` job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op in a single process)."""
    if rank_and_world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks, in one all-reduce.

    A parameter without a gradient on this rank counts as a zero gradient, so all ranks reduce
    tensors of the same shapes in the same order whatever their prompts touched.
    """
    world = rank_and_world()[1]
    if world == 1:
        return
    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (a new tensor)."""
    out = values.detach().clone()
    world = rank_and_world()[1]
    if world > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world
    return out


def rank_zero_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (time budgets must end the loop on all ranks at once)."""
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
