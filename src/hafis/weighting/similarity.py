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


@torch.no_grad()
def topk_mask(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """Boolean mask of the ``k`` largest entries of ``x`` along ``dim``; ties broken by the lower index.

    ``torch.topk`` gives no guarantee on which of several equal values it returns (and it differs between CPU and
    CUDA), so it is only used for the k-th largest *value*, which is unique; entries strictly above it are in, and
    the remaining slots go to the entries equal to it in index order. The result is deterministic on every device.
    """
    _check_k(k, x.shape[dim])
    kth = torch.topk(x, k, dim=dim, largest=True, sorted=True).values.narrow(dim, k - 1, 1)
    above = x > kth
    tied = x == kth
    free = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (torch.cumsum(tied, dim=dim) <= free))


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
    shared = (topk_mask(features, k, dim=1) & topk_mask(prototypes, k, dim=1)).sum(dim=1)
    dtype = features.dtype if features.is_floating_point() else torch.float32
    return shared.to(dtype) / k
