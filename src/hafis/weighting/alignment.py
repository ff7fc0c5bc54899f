"""Bringing decoder features to the resolution of the labels.

Segmenters give features at a fraction of the input size (stride 4 for DeepLabV3+) while labels and pseudo-labels
are at full size. hafis never resizes labels: features are brought to the labels' size, as the authors' code does
(bilinear with ``align_corners=True``, like UniMatch's logits; ``align_corners`` follows the segmenter's own resizes).
Resizing runs in float32 whatever the features' dtype: half-precision interpolation rounds neighbouring channels to
equal values, and the top-k would then break those ties by index instead of by the features. Only the pixels
actually used are resampled when possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGN_MODES = ("bilinear", "nearest")


def check_align(mode: str) -> str:
    if mode not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")
    return mode


def resize_features(features: Tensor, size: tuple[int, int], mode: str = "bilinear",
                    align_corners: bool = True) -> Tensor:
    """``(B, D, h, w) -> (B, D, H, W)``; a no-op when the sizes already agree; bilinear resizes in float32."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if check_align(mode) == "bilinear":
        return F.interpolate(_wide(features), size=size, mode="bilinear", align_corners=align_corners)
    return F.interpolate(features, size=size, mode="nearest")


def _wide(features: Tensor) -> Tensor:
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def sample_features(features: Tensor, batch: Tensor, flat_pixel: Tensor, size: tuple[int, int], mode: str,
                    align_corners: bool = True) -> Tensor:
    """Features at chosen label-resolution pixels, ``(n, D)``: equal to ``resize_features(...)[b, :, y, x]``.

    ``flat_pixel`` indexes the ``H*W`` label grid. Sampling only the chosen pixels (a few per class) avoids
    upsampling the whole ``B x D x H x W`` map just to push a handful of vectors into the bank.
    """
    H, W = size
    h, w = features.shape[-2:]
    if (h, w) == (H, W):
        return features.flatten(2)[batch, :, flat_pixel]
    y = torch.div(flat_pixel, W, rounding_mode="floor")
    x = flat_pixel - y * W
    if check_align(mode) == "nearest":
        # F.interpolate(mode="nearest") maps destination pixel i to floor(i * in / out).
        sy = torch.div(y * h, H, rounding_mode="floor")
        sx = torch.div(x * w, W, rounding_mode="floor")
        return features.flatten(2)[batch, :, sy * w + sx]
    # Bilinear as F.interpolate computes it, in float32: the source coordinate is i * (in - 1) / (out - 1) with
    # align_corners, else (i + 0.5) * in / out - 0.5 clamped at 0; the four neighbours are gathered for the chosen
    # pixels only.
    flat = features.flatten(2)  # (B, D, h*w)
    dtype = _wide(features[:0]).dtype
    y0, y1, ly = _source_index(y, H, h, dtype, align_corners)
    x0, x1, lx = _source_index(x, W, w, dtype, align_corners)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat[batch, :, yy * w + xx].to(dtype)

    ly, lx = ly[:, None], lx[:, None]
    top = at(y0, x0) * (1 - lx) + at(y0, x1) * lx
    bottom = at(y1, x0) * (1 - lx) + at(y1, x1) * lx
    return top * (1 - ly) + bottom * ly


def _source_index(dst: Tensor, out_size: int, in_size: int, dtype: torch.dtype,
                  align_corners: bool) -> tuple[Tensor, Tensor, Tensor]:
    if align_corners:
        # the scale as ATen computes it: a float32 division of the two integers
        scale = torch.tensor(float(in_size - 1)) / (out_size - 1) if out_size > 1 else torch.tensor(0.0)
        src = dst.to(torch.float32) * scale.to(dst.device)
    else:
        src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0.to(torch.float32)).to(dtype)
