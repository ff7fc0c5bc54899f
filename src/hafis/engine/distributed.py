"""Multi-process training under ``torchrun``: process group, gradient averaging, replica checks.

hafis averages gradients across ranks itself after ``backward`` (bucketed all-reduces of every parameter the
optimiser holds, the operation DDP performs) instead of wrapping the model in ``DistributedDataParallel``. The
frameworks call their network several times per step (UniMatch: two forward passes, mean teachers: a teacher) and
some own parameters outside the segmenter (U2PL's representation head); averaging the optimiser's gradients covers
all of that with no framework code aware of distribution. The price is no overlap of communication with the backward
pass, which matters little next to the multi-forward SSL steps.

Launched by ``torchrun --nproc_per_node=N -m hafis train CONFIG`` (or ``hafis train --nproc N``): backend nccl on
GPU, gloo on CPU; each rank takes ``1/N`` of the configured (global) batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistContext:
    """Join the process group torchrun describes in the environment; a plain run gets a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce and average the gradients of ``params`` in buckets of ~25 MB (like DDP's buckets)."""
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
            bucket, size = [], 0


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (seeding already makes them equal; this makes it certain)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    for t in module.buffers():
        dist.broadcast(t.data, src=0)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (a skipped step must be skipped everywhere)."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def check_replicas(module: torch.nn.Module, device: torch.device) -> None:
    """Raise if the ranks' copies of ``module`` drifted apart (a per-tensor checksum, compared exactly)."""
    sums = torch.stack([t.detach().double().sum() for t in module.state_dict().values()
                        if torch.is_tensor(t) and t.is_floating_point()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(f"{type(module).__name__} replicas differ between ranks; their state was not reduced "
                           "identically")
