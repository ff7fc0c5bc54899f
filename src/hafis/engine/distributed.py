"""Multi-process training under ``torchrun``: process group, DistributedDataParallel, replica checks.

What is optimised (the segmenter and any framework-owned network, e.g. U2PL's student = segmenter + representation
head) is gathered in one :class:`Networks` module and wrapped in one ``DistributedDataParallel``, so gradients are
averaged by DDP's bucketed all-reduce while the backward pass still runs. A framework keeps calling
``self.model(x)``: :func:`wrap` swaps each network attribute of the framework for a :class:`Route`, whose call goes
through DDP's forward (which prepares the gradient reduction) and whose every other attribute is the network's own
(parameters, ``state_dict``, ``train()`` / ``eval()``), so no framework knows it is distributed. Several forward
passes before one backward (UniMatch) and no-grad eval-mode forwards in between work as in the official codes.
EMA teachers stay unwrapped: they take no gradient.

DDP broadcasts rank 0's BatchNorm buffers before each forward pass (``forward_sync_buffers``); between forwards a
rank's buffers hold its own batch's update, so before an evaluation or a checkpoint the trainer broadcasts rank
0's buffers once (:func:`broadcast_buffers`) and then checks that every rank holds the same state.

Launched by ``torchrun --nproc_per_node=N -m hafis train CONFIG`` (or ``hafis train --nproc N``): backend nccl on
GPU, gloo on CPU; each rank takes ``1/N`` of the configured (global) batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


class DistributedSetupError(RuntimeError):
    """The process group could not be formed (rendezvous environment missing, peers unreachable)."""


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
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError, TimeoutError) as exc:  # DistNetworkError / DistStoreError are RuntimeErrors
            where = f"{os.environ.get('MASTER_ADDR', '<MASTER_ADDR unset>')}:{os.environ.get('MASTER_PORT', '<unset>')}"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedSetupError(
                f"rendezvous failed (rank {os.environ.get('RANK', '?')} of WORLD_SIZE={world}, {backend} at {where}): "
                f"{reason}; launch with torchrun (multi-node: the same --rdzv-endpoint, --rdzv-id and --nnodes on "
                f"every node, the endpoint reachable from all of them)") from None
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------- DDP
class Networks(nn.Module):
    """The optimised networks under one module, so one DDP holds all their parameters; ``forward(name, ...)`` runs
    the named one (networks may share submodules: U2PL's student contains the segmenter)."""

    def __init__(self, networks: dict[str, nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(networks)

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.networks[name](*args, **kwargs)


class Route:
    """Stands in for one network of a framework: calling it runs the network through DDP's forward; any other
    attribute (parameters, ``state_dict``, ``train`` / ``eval``, submodules) is the network's own."""

    def __init__(self, ddp: DistributedDataParallel, name: str, module: nn.Module) -> None:
        self.__dict__.update(_ddp=ddp, _name=name, module=module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(self._name, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.__dict__["module"], attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self.module, attr, value)


def unwrap(module: Any) -> Any:
    """The network behind a :class:`Route` (anything else unchanged)."""
    return module.module if isinstance(module, Route) else module


def wrap(owner: Any, names: Iterable[str], device: torch.device, static_graph: bool) -> DistributedDataParallel:
    """Wrap ``owner``'s network attributes ``names`` in one DDP and replace each by its :class:`Route`.

    ``static_graph``: every step uses the same parameters through the same calls (DDP then skips the per-step
    search for unused parameters); otherwise ``find_unused_parameters`` lets a step leave some without gradient.
    DDP broadcasts rank 0's parameters and buffers on construction.
    """
    networks = {name: unwrap(getattr(owner, name)) for name in names}
    ddp = DistributedDataParallel(
        Networks(networks), device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=True, gradient_as_bucket_view=True, static_graph=static_graph,
        find_unused_parameters=not static_graph)
    for name, module in networks.items():
        setattr(owner, name, Route(ddp, name, module))
    return ddp


# ----------------------------------------------------------------------------------------------- SyncBatchNorm
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss reaches every rank's input."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (gloo), which torch's SyncBatchNorm does not run on: the global batch's
    per-channel mean and variance come from all-reduced per-rank sums, and the gradients flow back through the same
    sums, as through torch's GPU kernels. Eval mode or one process: plain BatchNorm."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        count = _SumOverRanks.apply(x.new_tensor([x.numel() / channels]))
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * count / (count - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` (in place when ``module`` is not one itself) synchronised over the process
    group, keeping its parameters and buffers (``train.sync_bn``, as the released codes run): torch's SyncBatchNorm
    on GPUs, :class:`CpuSyncBatchNorm` on CPU."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if device.type == "cpu":
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = CpuSyncBatchNorm  # the same state; only the forward differs
    return module


# -------------------------------------------------------------------------------------------------- collectives
@torch.no_grad()
def broadcast_buffers(module: nn.Module, parameters: bool = False) -> None:
    """Rank 0's buffers (BatchNorm running statistics), and with ``parameters`` its parameters, on every rank."""
    for t in [*(module.parameters() if parameters else ()), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (a skipped step must be skipped everywhere)."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def check_replicas(module: nn.Module, device: torch.device) -> None:
    """Raise if the ranks' copies of ``module`` drifted apart (a per-tensor checksum, compared exactly)."""
    sums = torch.stack([t.detach().double().sum() for t in module.state_dict().values()
                        if torch.is_tensor(t) and t.is_floating_point()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(f"{type(module).__name__} replicas differ between ranks; their state was not reduced "
                           "identically")
