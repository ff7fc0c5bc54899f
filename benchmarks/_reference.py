"""What the fast weighting is measured against.

- ``reference_*``: the definition in docs/method.md, written plainly: ``torch.topk`` indices of every pixel
  and prototype, then a per-row set intersection (``torch.isin`` in a Python loop over rows); a bank of per-class
  Python lists filled by a loop over classes. Too slow to run on every row at paper scale, so the per-row loop is
  timed on a subsample of rows and its time extrapolated linearly (the loop's cost per row does not depend on N).
- ``topk_broadcast_*``: the vectorised version a careful user writes first: ``torch.topk`` indices and one broadcast
  ``==`` of the ``k x k`` index pairs per row (no index tie rule).
- ``mask_*``: an exact vectorised form: top-k mask from ``torch.topk`` values + a cumulative
  sum for ties, the whole-batch bilinear upsampling, an ``(hw x D) @ (D x C)`` product, and the bank's float sort.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from hafis.weighting import PrototypeBank
from hafis.weighting.alignment import resize_features, sample_features


# ------------------------------------------------------------------------------------------- straightforward
@torch.no_grad()
def reference_row_similarity(features: Tensor, prototypes: Tensor, k: int, rows: int) -> tuple[Tensor, float]:
    """``|topk(f_i) ∩ topk(p_i)| / k`` for the first ``rows`` rows, and the extrapolated seconds for all rows."""
    start = time.perf_counter()
    top_f = torch.topk(features, k, dim=1).indices
    top_p = torch.topk(prototypes, k, dim=1).indices
    vectorised = time.perf_counter() - start
    rows = min(rows, features.shape[0])
    out = torch.zeros(rows)
    start = time.perf_counter()
    for i in range(rows):
        out[i] = torch.isin(top_f[i], top_p[i]).sum() / k
    loop = time.perf_counter() - start
    return out, vectorised + loop * features.shape[0] / rows


@torch.no_grad()
def reference_weights(features: Tensor, labels: Tensor, prototypes: Tensor, has_prototype: Tensor, k: int,
                      rows: int, ignore_index: int = 255) -> tuple[Tensor, float]:
    """``s / k`` per pixel (features at the labels' resolution), per-row loop; the extrapolated seconds."""
    start = time.perf_counter()
    D = features.shape[1]
    flat = features.permute(0, 2, 3, 1).reshape(-1, D)
    lab = labels.reshape(-1)
    top_f = torch.topk(flat, k, dim=1).indices
    top_p = torch.topk(prototypes, k, dim=1).indices
    vectorised = time.perf_counter() - start
    rows = min(rows, flat.shape[0])
    out = torch.zeros(rows)
    start = time.perf_counter()
    for i in range(rows):
        c = int(lab[i])
        if c != ignore_index and bool(has_prototype[c]):
            out[i] = torch.isin(top_f[i], top_p[c]).sum() / k
    loop = time.perf_counter() - start
    return out, vectorised + loop * flat.shape[0] / rows


class ReferenceBank:
    """Per-class Python lists of at most ``memory`` vectors; a push loops over the classes."""

    def __init__(self, num_classes: int, feature_dim: int, memory: int = 256, samples: int = 32,
                 ignore_index: int = 255) -> None:
        self.C, self.D, self.M, self.n, self.ignore = num_classes, feature_dim, memory, samples, ignore_index
        self.queues = [torch.zeros(0, feature_dim) for _ in range(num_classes)]

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor, mask: Tensor) -> None:
        flat = features.permute(0, 2, 3, 1).reshape(-1, self.D)
        lab, m = labels.reshape(-1), mask.reshape(-1)
        for c in range(self.C):
            idx = torch.nonzero((lab == c) & m).flatten()
            if idx.numel() == 0:
                continue
            pick = idx[torch.randperm(idx.numel())[: self.n]]
            self.queues[c] = torch.cat([self.queues[c], flat[pick]])[-self.M:]

    def prototypes(self) -> tuple[Tensor, Tensor]:
        has = torch.tensor([q.shape[0] > 0 for q in self.queues])
        protos = torch.stack([q.mean(0) if q.shape[0] else torch.zeros(self.D) for q in self.queues])
        return protos, has


# ----------------------------------------------------------------------------------------- vectorised topk
@torch.no_grad()
def topk_broadcast_similarity(features: Tensor, prototypes: Tensor, k: int) -> Tensor:
    top_f = torch.topk(features, k, dim=1).indices
    top_p = torch.topk(prototypes, k, dim=1).indices
    return (top_f[:, :, None] == top_p[:, None, :]).any(dim=2).sum(dim=1) / k


@torch.no_grad()
def topk_broadcast_weights(features: Tensor, labels: Tensor, prototypes: Tensor, has_prototype: Tensor, k: int,
                           ignore_index: int = 255) -> Tensor:
    top_f = torch.topk(features.permute(0, 2, 3, 1), k, dim=-1).indices  # (B, h, w, k)
    top_p = torch.topk(prototypes, k, dim=1).indices  # (C, k)
    ignored = labels == ignore_index
    cls = torch.where(ignored, 0, labels)
    s = (top_f[..., :, None] == top_p[cls][..., None, :]).any(dim=-1).sum(dim=-1)
    return torch.where(ignored | ~has_prototype[cls], 0, s) / k


# --------------------------------------------------------------------- the exact top-k mask + matrix product
@torch.no_grad()
def mask_topk(x: Tensor, k: int, dim: int = -1) -> Tensor:
    kth = torch.topk(x, k, dim=dim, largest=True, sorted=True).values.narrow(dim, k - 1, 1)
    above = x > kth
    tied = x == kth
    free = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (torch.cumsum(tied, dim=dim) <= free))


@torch.no_grad()
def mask_similarity(features: Tensor, prototypes: Tensor, k: int) -> Tensor:
    return (mask_topk(features, k, dim=1) & mask_topk(prototypes, k, dim=1)).sum(dim=1) / k


@torch.no_grad()
def mask_weights(weighter, features: Tensor, pseudo_labels: Tensor) -> Tensor:
    """``PseudoLabelWeighter.weights`` by top-k masks and one product (with validation, like the fast one)."""
    from hafis.weighting.checks import check_features_labels

    if weighter.validate:
        check_features_labels(features, pseudo_labels, weighter.num_classes, weighter.ignore_index, "pseudo_labels",
                              feature_dim=weighter.feature_dim)
    B, H, W = pseudo_labels.shape
    protos, has_proto = weighter.bank.prototypes()
    proto_mask = mask_topk(protos, weighter.k, dim=1) & has_proto[:, None]
    features = features.contiguous(memory_format=torch.channels_last)
    if weighter.align == "bilinear":
        features = resize_features(features, (H, W), "bilinear")
    b, d, h, w = features.shape
    feat_mask = mask_topk(features.permute(0, 2, 3, 1), weighter.k, dim=-1)
    scores = torch.matmul(feat_mask.reshape(b, h * w, d).float(), proto_mask.t().float())
    scores = scores.view(b, h, w, weighter.num_classes).permute(0, 3, 1, 2)
    if (h, w) != (H, W):
        scores = F.interpolate(scores, size=(H, W), mode="nearest")
    labels = pseudo_labels.long()
    ignored = labels == weighter.ignore_index
    s = scores.gather(1, torch.where(ignored, 0, labels)[:, None]).squeeze(1)
    s = torch.where(ignored, 0, s.round().long())
    return weighter.offset + s.float() / weighter.k


class SortBank(PrototypeBank):
    """:class:`PrototypeBank` choosing its pixels by one float sort of noisy class keys."""

    def _select(self, features, labels, mask):
        B, H, W = labels.shape
        C, n = self.num_classes, self.samples_per_class
        labels = labels.long()
        qualifies = labels != self.ignore_index
        if mask is not None:
            qualifies &= mask.bool()
        noise = torch.rand(labels.shape, generator=self._generator(labels.device), device=labels.device) * 0.5
        key = torch.where(qualifies, labels.to(noise.dtype), torch.full_like(noise, float(C))) + noise
        order = torch.argsort(key.flatten(), stable=True)
        per_class = torch.zeros(C + 1, dtype=torch.long, device=labels.device)
        per_class.scatter_add_(0, torch.where(qualifies, labels, C).flatten(), torch.ones_like(order))
        start = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(n, device=labels.device)
        valid = rank[None, :] < per_class[:C, None]
        pos = (start[:C, None] + rank[None, :]).clamp_max(order.numel() - 1)
        pixel = order[pos].flatten()
        batch = torch.div(pixel, H * W, rounding_mode="floor")
        values = sample_features(features, batch, pixel - batch * H * W, (H, W), self.align)
        return values.view(C, n, -1).float(), valid


# --------------------------------------------------------------------------- hand-written data parallelism
@torch.no_grad()
def hand_average_gradients(params, world_size: int, bucket_bytes: int = 25 * 1024 * 1024) -> None:
    """What DistributedDataParallel replaces in hafis (hand-written): after ``backward`` has finished,
    all-reduce and average the gradients in ~25 MB buckets (no overlap with the backward pass)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                dst.copy_(src)
            bucket, size = [], 0


@torch.no_grad()
def hand_broadcast_buffers(module) -> None:
    """Its partner: rank 0's BatchNorm buffers on every rank after each optimiser step."""
    import torch.distributed as dist

    for t in module.buffers():
        dist.broadcast(t.data, src=0)
