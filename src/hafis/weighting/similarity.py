"""High-activation feature index similarity: how many of a pixel's top-k channels its class prototype shares.

The statistic only looks at *which* channels are the k largest, never at their values, so it is invariant to any
positive scaling of a feature and insensitive to small noise: that robustness is the point of the method.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_k(k: int, dim: int, name: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    if k > dim:
        raise ValueError(f"{name}={k} is larger than the feature dimension D={dim}")


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
    half a key, take k passes of ``torch.max`` (documented to return the first maximal index). On CPU the rows are
    processed in cache-sized blocks (a loop over blocks of thousands of rows, never over pixels or channels); on
    other devices in one block.
    """
    _check_k(k, x.shape[dim])
    x = x.movedim(dim, -1)
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    keyed = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    work = torch.int64 if keyed else torch.float64
    block = max(1, CPU_BLOCK_BYTES // (8 * d)) if x.device.type == "cpu" else n
    if n:
        scratch = torch.empty(min(block, n), d, dtype=work, device=x.device)
        low = torch.arange(d - 1, -1, -1, dtype=torch.int64, device=x.device) if keyed else None
        for start in range(0, n, block):
            stop = min(start + block, n)
            if keyed:
                _keyed_topk(rows[start:stop], k, scratch[: stop - start], low, out[start:stop])
            else:
                y = scratch[: stop - start]
                y.copy_(rows[start:stop])
                _knockout_topk(y, k, out[start:stop])
    return out.view(*lead, k).movedim(-1, dim)


def _keyed_topk(rows: Tensor, k: int, key: Tensor, low: Tensor, out: Tensor) -> None:
    """``out (n, k)`` = top-k indices of float ``rows (n, D)`` through unique int64 keys built in ``key (n, D)``."""
    # order-preserving int32 of the float32 value: +0.0 for -0.0 (so they tie), then the sign-magnitude bits of a
    # negative number flipped (so a more negative number gets a smaller integer)
    value = rows.to(torch.float32) + 0.0
    bits = value.view(torch.int32)
    flip = torch.bitwise_right_shift(bits, 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
    key.copy_(flip)
    key.bitwise_left_shift_(32).add_(low)  # value in the high half, D - 1 - index in the low half
    d, knocked_out = key.shape[1], torch.iinfo(torch.int64).min
    for j in range(k):  # k (the method's 5) passes, each over all rows and channels of the block at once
        index = (d - 1) - key.amax(dim=1).bitwise_and_(0xFFFFFFFF)
        out[:, j] = index
        key.scatter_(1, index[:, None], knocked_out)


def _knockout_topk(y: Tensor, k: int, out: Tensor) -> None:
    """``out (n, k)`` = the top-k indices of the rows of float64 ``y (n, D)``, which is overwritten."""
    neg_inf = float("-inf")
    for j in range(k):
        value, index = y.max(dim=1)  # the first maximal index
        if j:
            # all remaining entries are -inf: the first index not chosen yet (the smallest absent from out[:, :j],
            # which is at most j), not the first -inf entry, which may be a knocked-out one
            chosen = out[:, :j]
            candidates = torch.arange(j + 1, device=y.device)
            free = ~(chosen[:, :, None] == candidates).any(dim=1)
            index = torch.where(value == neg_inf, free.to(torch.uint8).argmax(dim=1), index)
        out[:, j] = index
        y.scatter_(1, index[:, None], neg_inf)


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
    _check_k(k, features.shape[1])
    shared = topk_mask(prototypes, k, dim=1).gather(1, topk_indices(features, k, dim=1)).sum(dim=1)
    dtype = features.dtype if features.is_floating_point() else torch.float32
    return shared.to(dtype) / k
