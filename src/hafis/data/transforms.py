"""Augmentations of the SSL recipes, as functions of an explicit ``numpy`` generator.

Every random draw comes from the ``rng`` argument, which the datasets derive from (seed, epoch, index): the same
sample gets the same augmentation whatever the worker count, and a resumed run replays it exactly.

Weak (all frameworks): random rescale, pad-and-crop, horizontal flip. Label-like maps (masks, box masks) go through
the same geometry with nearest interpolation, so they stay aligned with the pixels.
Strong (UniMatch's published recipe): colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale p 0.2, Gaussian
blur p 0.5 (sigma 0.1-2.0), and a CutMix box (p 0.5, area 2-40 %, aspect 0.3-3.3).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor_image(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 numpy -> ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def normalize(image: Tensor) -> Tensor:
    """uint8 ``(3, H, W)`` -> float, ImageNet-normalised (the backbones' pretraining statistics)."""
    x = image.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def weak_geometry(
    image: Tensor,
    maps: Sequence[tuple[Tensor, int]],
    crop_size: int,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[Tensor, list[Tensor]]:
    """Rescale (long side × U(scale_range)), pad to the crop (image 0, each map its own fill), crop, flip.

    ``maps`` are ``(tensor (..., H, W), fill)`` pairs: masks use fill 255 (ignore), a box mask fill 0.
    """
    _, h, w = image.shape
    scale = rng.uniform(*scale_range)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    maps = [(_resize_nearest(m, (nh, nw)), fill) for m, fill in maps]
    ph, pw = max(crop_size - nh, 0), max(crop_size - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        maps = [(F.pad(m, (0, pw, 0, ph), value=fill), fill) for m, fill in maps]
    H, W = image.shape[-2:]
    y0 = int(rng.integers(0, H - crop_size + 1))
    x0 = int(rng.integers(0, W - crop_size + 1))
    flip = rng.random() < 0.5
    image = image[:, y0:y0 + crop_size, x0:x0 + crop_size]
    out_maps = [m[..., y0:y0 + crop_size, x0:x0 + crop_size] for m, _ in maps]
    if flip:
        image = image.flip(-1)
        out_maps = [m.flip(-1) for m in out_maps]
    return image.contiguous(), [m.contiguous() for m in out_maps]


def _resize_nearest(m: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    lead = m.shape[:-2]
    x = m.reshape(1, -1, *m.shape[-2:])
    dtype = x.dtype
    x = F.interpolate(x.float(), size=size, mode="nearest").to(dtype)
    return x.reshape(*lead, *size)


def strong_colour(image: Tensor, rng: np.random.Generator) -> Tensor:
    """UniMatch's strong intensity augmentation of a uint8 ``(3, H, W)`` image."""
    if rng.random() < 0.8:
        b, c, s = (rng.uniform(0.5, 1.5) for _ in range(3))
        hue = rng.uniform(-0.25, 0.25)
        for op in rng.permutation(4):
            if op == 0:
                image = TF.adjust_brightness(image, b)
            elif op == 1:
                image = TF.adjust_contrast(image, c)
            elif op == 2:
                image = TF.adjust_saturation(image, s)
            else:
                image = TF.adjust_hue(image, hue)
    if rng.random() < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.1, 2.0)
        ksize = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, kernel_size=[ksize, ksize], sigma=[sigma, sigma])
    return image


def cutmix_box(size: int, rng: np.random.Generator, p: float = 0.5,
               area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """``(size, size)`` uint8 mask with one random box (all zeros with probability ``1 - p``).

    As UniMatch's ``obtain_cutmix_box``: the area is drawn once, and only the aspect ratio and the position are
    redrawn until the box fits. Redrawing the area too would reject large areas more often and skew boxes small.
    """
    box = torch.zeros(size, size, dtype=torch.uint8)
    if rng.random() >= p:
        return box
    a = rng.uniform(*area) * size * size
    while True:
        r = rng.uniform(*ratio)
        bw, bh = int(math.sqrt(a / r)), int(math.sqrt(a * r))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + bw <= size and y + bh <= size:
            box[y:y + bh, x:x + bw] = 1
            return box
