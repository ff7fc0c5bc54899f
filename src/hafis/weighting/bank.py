"""Class prototypes from per-class FIFO memories of labelled and reliable unlabelled pixel features.

Each class has two ring buffers of at most ``memory_per_class`` feature vectors: one fed by labelled pixels the
model already gets right, one fed by *reliable* unlabelled pixels. The prototype of a class is the mean of both
buffers together. Everything is vectorised over classes and pixels, and a push needs no host-device sync, so the
bank is cheap enough to update every iteration.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .alignment import check_align, sample_features
from .checks import check_features_labels


class _RingMemory(nn.Module):
    """``C`` ring buffers of ``M`` vectors each; slot ``M`` is a scratch slot that absorbs masked-out writes."""

    def __init__(self, num_classes: int, feature_dim: int, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.register_buffer("queue", torch.zeros(num_classes, capacity + 1, feature_dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    def push(self, values: Tensor, valid: Tensor) -> None:
        """``values (C, n, D)`` with ``valid (C, n)``: the valid entries of each class, in order, are appended.

        When more than ``capacity`` arrive at once only the newest ``capacity`` are kept, so the buffer always
        holds exactly the most recent vectors of its class.
        """
        M = self.capacity
        order = torch.cumsum(valid, dim=1) - 1  # position of each valid entry among its class's new entries
        total = valid.sum(dim=1)
        keep = valid & (order >= (total - M)[:, None])
        slot = torch.where(keep, (self.ptr[:, None] + order) % M, torch.full_like(order, M))
        rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(slot)
        self.queue.index_put_((rows, slot), values.to(self.queue.dtype))
        self.queue[:, M].zero_()
        self.ptr.copy_((self.ptr + total) % M)
        self.count.copy_((self.count + total).clamp_max(M))

    def sums(self) -> Tensor:
        # unfilled slots are zero and, once filled, a slot stays filled: the plain sum is the sum of the contents
        return self.queue[:, : self.capacity].sum(dim=1)

    def contents(self, cls: int) -> Tensor:
        """The stored vectors of one class, oldest first (for inspection and tests, not for the hot path)."""
        n, M = int(self.count[cls]), self.capacity
        start = (int(self.ptr[cls]) - n) % M
        idx = (torch.arange(n, device=self.queue.device) + start) % M
        return self.queue[cls, idx]


class PrototypeBank(nn.Module):
    """Per-class prototypes ``(C, D)`` = mean of a labelled and an unlabelled FIFO memory of features.

    Args:
        num_classes: ``C``.
        feature_dim: ``D``, channels of the decoder feature.
        memory_per_class: capacity of each of the two queues of a class (the paper: 256).
        samples_per_class: at most this many pixels of each class are pushed per call, chosen at random among the
            qualifying ones; a few per image keeps one large object from filling a queue in a single batch.
        ignore_index: label value that never enters the bank.
        seed: seeds the generator of the random subsample, so runs are reproducible (rank ``r`` of a process group
            uses ``seed + r``, so the ranks' draws are not copies of each other).
        align: how features at a lower resolution than the labels are read: ``bilinear`` (the authors' code
            upsamples features like logits) or ``nearest``. Labels are never resized.
        gather_distributed: under ``torch.distributed`` every rank's pushes are all-gathered and applied by every
            rank in rank order, so all ranks hold one identical bank. ``samples_per_class`` is then the quota of
            the global batch, split across the ranks (rank ``r`` of ``N`` takes ``n // N``, plus one when
            ``r < n % N``), so ``N`` processes feed the bank as many vectors per step as one process would.
        validate: check label ranges and shapes on each push (one host sync); turn off in tuned GPU loops.
        align_corners: of the bilinear read (the segmenter's own; UniMatch's DeepLabV3+: True).
        require_labelled: a class has a prototype only when its *labelled* queue is non-empty (the authors' code);
            false: when either queue is (hafis's default, so a class seen only in reliable unlabelled pixels is
            weighted too).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        memory_per_class: int = 256,
        samples_per_class: int = 32,
        ignore_index: int = 255,
        seed: int = 0,
        align: str = "bilinear",
        gather_distributed: bool = True,
        validate: bool = True,
        align_corners: bool = True,
        require_labelled: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("feature_dim", feature_dim),
                            ("memory_per_class", memory_per_class), ("samples_per_class", samples_per_class)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.memory_per_class = memory_per_class
        self.samples_per_class = min(samples_per_class, memory_per_class)
        self.ignore_index = ignore_index
        self.seed = seed
        self.align = check_align(align)
        self.align_corners = bool(align_corners)
        self.require_labelled = bool(require_labelled)
        self.gather_distributed = gather_distributed
        self.validate = validate
        self.labelled = _RingMemory(num_classes, feature_dim, memory_per_class)
        self.unlabelled = _RingMemory(num_classes, feature_dim, memory_per_class)
        self._generators: dict[str, torch.Generator] = {}

    # ----------------------------------------------------------------------------------------------- pushes
    @torch.no_grad()
    def push_labelled(self, features: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> None:
        """Push labelled pixels where ``mask`` holds (e.g. predicted right with confidence > 0.95)."""
        self._push(self.labelled, features, labels, mask, "labels", "mask")

    @torch.no_grad()
    def push_unlabelled(self, features: Tensor, pseudo_labels: Tensor, reliable: Tensor) -> None:
        """Push the reliable unlabelled pixels (detector-verified, or confident, by the caller's rule)."""
        self._push(self.unlabelled, features, pseudo_labels, reliable, "pseudo_labels", "reliable")

    def _push(self, memory: _RingMemory, features: Tensor, labels: Tensor, mask: Optional[Tensor],
              labels_name: str, mask_name: str) -> None:
        if self.validate:
            check_features_labels(features, labels, self.num_classes, self.ignore_index, labels_name,
                                  feature_dim=self.feature_dim, mask=mask, mask_name=mask_name)
        rank, world = _rank_and_world() if self.gather_distributed else (0, 1)
        n = self.samples_per_class
        values, valid = self._select(features, labels, mask, -(-n // world), n // world + (rank < n % world))
        if world > 1:
            values, valid = _all_gather_classwise(values, valid)
        memory.push(values, valid)

    def _select(self, features: Tensor, labels: Tensor, mask: Optional[Tensor], n: Optional[int] = None,
                quota: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """A random subsample of at most ``quota <= n`` qualifying pixels per class: ``(C, n, D)``, ``(C, n)``
        (both default to ``samples_per_class``; a rank's quota may be one less than the ``n`` all ranks gather).

        Fixed-size output (no ``nonzero``): every pixel gets the key ``class + U[0, 1/2)`` (or ``C`` when it does not
        qualify; the half keeps float rounding from pushing a key into the next class); one sort groups pixels by
        class in random order, and the first ``quota`` of each class are taken.
        """
        B, H, W = labels.shape
        C = self.num_classes
        n = self.samples_per_class if n is None else n
        quota = n if quota is None else quota
        labels = labels.long()
        # out-of-range labels never qualify, so a push with validation off (no host sync) cannot index out of bounds
        qualifies = (labels != self.ignore_index) & (labels >= 0) & (labels < C)
        if mask is not None:
            qualifies &= mask.bool()
        noise = torch.rand(labels.shape, generator=self._generator(labels.device), device=labels.device) * 0.5
        key = torch.where(qualifies, labels.to(noise.dtype), torch.full_like(noise, float(C))) + noise
        # the keys are non-negative floats, whose bit patterns sort like the floats: sorting them as integers gives
        # the same permutation and takes the CPU's radix sort (several times faster than the float sort)
        key = key.flatten()
        bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(key.dtype)
        order = torch.argsort(key if bits is None else key.view(bits), stable=True)
        per_class = torch.zeros(C + 1, dtype=torch.long, device=labels.device)
        per_class.scatter_add_(0, torch.where(qualifies, labels, C).flatten(), torch.ones_like(order))
        start = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(n, device=labels.device)
        valid = rank[None, :] < per_class[:C, None].clamp_max(quota)
        pos = (start[:C, None] + rank[None, :]).clamp_max(order.numel() - 1)
        pixel = order[pos].flatten()
        batch = torch.div(pixel, H * W, rounding_mode="floor")
        values = sample_features(features, batch, pixel - batch * H * W, (H, W), self.align,
                                 self.align_corners)
        return values.view(C, n, -1).float(), valid

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + _rank_and_world()[0])
            self._generators[key] = gen
        return self._generators[key]

    # ---------------------------------------------------------------------------------------------- readout
    @torch.no_grad()
    def prototypes(self) -> tuple[Tensor, Tensor]:
        """``(prototypes (C, D), has_prototype (C,))``; a class with both queues empty has a zero row, and so
        does one with an empty labelled queue under ``require_labelled``."""
        total = (self.labelled.count + self.unlabelled.count).to(self.labelled.queue.dtype)
        protos = (self.labelled.sums() + self.unlabelled.sums()) / total.clamp_min(1.0)[:, None]
        has = self.labelled.count > 0 if self.require_labelled else total > 0
        return protos * has[:, None], has

    # ------------------------------------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"generators": {k: g.get_state() for k, g in self._generators.items()}}

    def set_extra_state(self, state: dict) -> None:
        self._generators = {}
        for key, gen_state in state.get("generators", {}).items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_classwise(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's ``(C, n, D)`` selection along ``n`` in rank order (same shapes on all ranks)."""
    world = dist.get_world_size()
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_valid = [torch.empty_like(valid) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous())
    dist.all_gather(all_valid, valid.contiguous())
    return torch.cat(all_values, dim=1), torch.cat(all_valid, dim=1)
