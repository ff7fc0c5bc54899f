"""High-activation feature index similarity: how many of a pixel's top-k channels its class prototype shares.

The statistic only looks at *which* channels are the k largest, never at their values, so it is invariant to any
positive scaling of a feature and insensitive to small noise: that robustness is the point of the method.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_k

#: size of the blocks of rows :func:`topk_indices` works on, on CPU: a block's keys (4 MiB, 2048 rows at D = 256) stay
#: in cache for the k passes, so the features are read from memory once
CPU_BLOCK_BYTES = 4 << 20


@torch.no_grad()
def topk_indices(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """Indices of the ``k`` largest entries of ``x`` along ``dim``, largest first; ties broken by the lower index.

    Returns a long tensor of ``x``'s shape with ``dim`` of size ``k`` (like ``torch.topk(...).indices``). The set of
    indices is exactly :func:`topk_mask`'s; the order is by value, then by index. ``-0.0`` ties with ``0.0``;
    ``-inf`` entries are chosen when a row has fewer than ``k`` larger ones; NaN entries are placed deterministically
    (not an error, but not meaningful either).

    ``torch.topk`` gives no guarantee on which of several equal values it returns (and it differs between CPU and
    CUDA), and on CPU it is a partial sort per row. Here every entry gets a unique 64-bit integer key: its value's
    bits, made order-preserving, in the high half, and ``D - 1 - index`` in the low half, so one key is larger than
    another exactly when its value is larger, or equal with a lower index. The top-k is then ``k`` passes of a
    row-wise ``amax`` (a plain vectorised reduction), each knocking the chosen key out. Exact, deterministic on every
    device, and on CPU several times faster than ``torch.topk`` alone. float16 / bfloat16 / float32 inputs take this
    path (the half types are widened to float32 exactly); float64 and integer inputs, whose values do not fit in
    half a key, take a stable descending sort (equal values keep their index order). A contiguous ``x`` reduced
    along a dimension other than its last (channels-first features) is ranked in place, across ``D`` rows of
    contiguous columns (one pass per leading index, e.g. per image); other layouts as rows of ``D``. On CPU the work
    is split into cache-sized blocks (a loop over blocks of thousands of rows, never over pixels or channels); on
    other devices it runs in one block.
    """
    check_k(k, x.shape[dim])
    dim = dim % x.dim()
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return torch.sort(x, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    d, device = x.shape[dim], x.device
    lead = x.movedim(dim, -1).shape[:-1]
    block = max(1, CPU_BLOCK_BYTES // (8 * d)) if device.type == "cpu" else None
    if x.stride(dim) != 1 and x.is_contiguous():
        # channels-first (e.g. the model's (B, D, h, w)): reduce across D rows of contiguous pixel columns, each
        # pass an elementwise max of D vectors; no transposed copy of the input
        L, M = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])
        cols = x.reshape(L, d, M)
        out = torch.empty(L, M, k, dtype=torch.long, device=device)
        step = block or max(M, 1)
        tasks = [(cols[i, :, s:s + step], out[i, s:s + step]) for i in range(L) for s in range(0, M, step)]
        _run_keyed(tasks, k, 0, (d, min(step, M)), device)
        return out.view(*lead, k).movedim(-1, dim)
    rows = x.movedim(dim, -1).reshape(-1, d)
    n = rows.shape[0]
    out = torch.empty(n, k, dtype=torch.long, device=device)
    step = block or max(n, 1)
    if n:
        _run_keyed([(rows[s:s + step], out[s:s + step]) for s in range(0, n, step)], k, 1, (min(step, n), d), device)
    return out.view(*lead, k).movedim(-1, dim)


def _run_keyed(tasks: list, k: int, axis: int, shape: tuple[int, int], device: torch.device) -> None:
    """Run :func:`_keyed_topk` on ``(block, out)`` tasks, one after the other, reusing one set of scratch buffers."""
    scratch = _KeyScratch(shape, device, column=axis == 0)
    for src, out in tasks:
        _keyed_topk(src, k, axis, scratch.view(src.shape[1 - axis]), out)


class _KeyScratch:
    """Buffers of one block: int64 keys, int32 sign and value, and ``D - 1 - index`` for the low words."""

    def __init__(self, shape: tuple[int, int], device: torch.device, column: bool) -> None:
        self.column = column
        d = shape[0] if column else shape[1]
        self.key = torch.empty(shape, dtype=torch.int64, device=device)
        self.sign = torch.empty(shape, dtype=torch.int32, device=device)
        self.value = torch.empty(shape, dtype=torch.int32, device=device)
        low = torch.arange(d - 1, -1, -1, dtype=torch.int64, device=device)
        self.low = low[:, None] if column else low

    def view(self, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cut = (lambda t: t[:, :m]) if self.column else (lambda t: t[:m])  # noqa: E731
        return cut(self.key), cut(self.sign), cut(self.value), self.low


def _keyed_topk(src: Tensor, k: int, axis: int, scratch: tuple, out: Tensor) -> None:
    """``out (m, k)`` = top-k indices along ``axis`` of the float block ``src`` (``(m, D)`` rows for axis 1, ``(D, m)``
    columns for axis 0), through unique int64 keys built in the scratch buffers."""
    key, sign, value, low = scratch
    # order-preserving int32 of the float32 value: the sign-magnitude bits as two's complement, i.e. the magnitude
    # negated for a negative number (-0.0 and 0.0 both give 0, so they tie, as they compare equal)
    bits = src.to(torch.float32).view(torch.int32)
    torch.bitwise_right_shift(bits, 31, out=sign)  # 0 or -1
    torch.bitwise_and(bits, 0x7FFFFFFF, out=value).bitwise_xor_(sign).sub_(sign)
    key.copy_(value)
    # value in the high half, D - 1 - index in the low half (an OR: integer adds go through a slow int64 multiply)
    key.bitwise_left_shift_(32).bitwise_or_(low)
    d, knocked_out = key.shape[axis], torch.iinfo(torch.int64).min
    if axis == 0:
        # across rows, two reductions over about sqrt(D) rows each run faster than one over all D (same maximum)
        a = max(f for f in range(1, math.isqrt(d) + 1) if d % f == 0)
        split = key.view(a, d // a, key.shape[1])
        row_max = lambda: split.amax(dim=0).amax(dim=0)  # noqa: E731
    else:
        row_max = lambda: key.amax(dim=1)  # noqa: E731
    for j in range(k):  # k (the method's 5) passes, each over the whole block at once
        index = (d - 1) - row_max().bitwise_and_(0xFFFFFFFF)
        out[:, j] = index
        key.scatter_(axis, index.unsqueeze(axis), knocked_out)


@torch.no_grad()
def topk_mask(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """Boolean mask of the ``k`` largest entries of ``x`` along ``dim``; ties broken by the lower index.

    Exactly ``k`` entries per row, deterministic on every device (see :func:`topk_indices`, which it scatters).
    """
    return torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(dim, topk_indices(x, k, dim), True)


@torch.no_grad()
def topk_index_similarity(features: Tensor, prototypes: Tensor, k: int = 5) -> Tensor:
    """``|topk_idx(features[i]) ∩ topk_idx(prototypes[i])| / k`` for row-aligned ``(N, D)`` inputs.

    Returns a ``(N,)`` tensor in ``{0, 1/k, ..., 1}`` of the features' dtype (float32 for integer inputs).
    No gradient flows: the weight is a constant of the loss, as in the paper.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    if prototypes.shape != features.shape:
        raise ValueError(
            f"prototypes must have the shape of features {tuple(features.shape)}, got {tuple(prototypes.shape)}"
        )
    check_k(k, features.shape[1])
    # both index sets are duplicate-free, so the number of equal (i, j) index pairs is the size of the intersection
    top_f, top_p = topk_indices(features, k, dim=1), topk_indices(prototypes, k, dim=1)
    shared = (top_f[:, :, None] == top_p[:, None, :]).sum(dim=(1, 2))
    dtype = features.dtype if features.is_floating_point() else torch.float32
    return shared.to(dtype) / k
