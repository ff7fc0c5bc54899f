"""Augmentations of the SSL recipes, as functions of an explicit ``numpy`` generator.

Every random draw comes from the ``rng`` argument, which the datasets derive from (seed, epoch, index): the same
sample gets the same augmentation whatever the worker count, and a resumed run replays it exactly.

Weak (all frameworks): random rescale, pad-and-crop, horizontal flip, drawn and applied as the framework's release
does (:class:`Geometry`: the scale draw, the padding's side and colour, the flip's place, antialiasing). Label-like
maps (masks, ignore regions, box masks) go through the same geometry with a pixel-centre nearest resize (PIL's
``NEAREST``), so they stay aligned with the pixels.
Strong (UniMatch's published recipe, PIL's operations as released): colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.8,
grayscale p 0.2, Gaussian blur p 0.5 (radius 0.1-2.0), and a CutMix box (p 0.5, area 2-40 %, aspect 0.3-3.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
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


@dataclass(frozen=True)
class Geometry:
    """How a framework's release draws and applies the weak geometry; each framework names its own
    (:attr:`hafis.frameworks.base.Traits.geometry`), so the recipe, not a user's switch, chooses it.

    ``scale``: how the resized size is drawn from ``data.scale_range`` ``(lo, hi)``, one of :data:`SCALE_DRAWS`.
    ``pad``: where the padding up to the crop goes, one of :data:`PAD_SIDES`. ``image_fill``: the padding's RGB colour.
    ``flip``: ``after_crop`` (the PIL releases) or ``before_pad`` (U2PL / AEL: flip, then pad, then crop).
    ``antialias``: shrink images with an antialiasing (PIL-like) bilinear filter, as PIL's ``BILINEAR`` does; the
    tensor releases (U2PL / AEL) interpolate without it.
    Label-like maps (masks, ignore regions, box masks) are always resized pixel-centre (PIL ``NEAREST``), so they stay
    aligned with the image whatever the release does.
    """

    scale: str = "long_side"
    pad: str = "bottom_right"
    image_fill: tuple[int, int, int] = (0, 0, 0)
    flip: str = "after_crop"
    antialias: bool = True

    def __post_init__(self):
        for name, allowed in (("scale", SCALE_DRAWS), ("pad", PAD_SIDES), ("flip", FLIP_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Geometry.{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")


def _long_side(h: int, w: int, lo: float, hi: float, rng: np.random.Generator) -> tuple[int, int]:
    """UniMatch / UniMatch V2 / AugSeg: the long side uniform in the integers ``int(L·lo) .. int(L·hi)``, the short
    side rounded to keep the aspect (``int(short · long / L + 0.5)``)."""
    long_side = int(rng.integers(int(max(h, w) * lo), int(max(h, w) * hi) + 1))
    if h > w:
        return long_side, int(1.0 * w * long_side / h + 0.5)
    return int(1.0 * h * long_side / w + 0.5), long_side


def _piecewise(h: int, w: int, lo: float, hi: float, rng: np.random.Generator) -> tuple[int, int]:
    """U2PL / AEL (``RandResize``): with probability 1/2 a factor uniform in ``[lo, 1)``, else in ``[1, hi)``; each
    side ``int(side · factor)``."""
    s = lo + (1.0 - lo) * rng.random() if rng.random() < 0.5 else 1.0 + (hi - 1.0) * rng.random()
    return int(h * s), int(w * s)


#: ``Geometry.scale``: the resized-size draws of the releases
SCALE_DRAWS = {"long_side": _long_side, "piecewise": _piecewise}
#: ``Geometry.pad``: padding on the bottom and right (UniMatch, AugSeg) or split around the image (U2PL / AEL, the
#: odd pixel bottom / right)
PAD_SIDES = ("bottom_right", "centre")
FLIP_ORDERS = ("after_crop", "before_pad")
#: the geometry UniMatch, UniMatch V2 and the other PIL-based releases use
PIL_GEOMETRY = Geometry()
#: the ImageNet mean colour, rounded to uint8: what U2PL / AEL pad with (0 after normalisation)
MEAN_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
#: U2PL's and AEL's tensor pipeline (``RandResize``, ``RandomHorizontalFlip``, ``Crop`` on normalised tensors):
#: piecewise scale, flip before the padding, centred padding with the mean colour, no antialiasing
TENSOR_GEOMETRY = Geometry(scale="piecewise", pad="centre", image_fill=MEAN_RGB, flip="before_pad", antialias=False)


@dataclass(frozen=True)
class GeometryDraw:
    """One sample's weak geometry: the resized ``size`` ``(h, w)``, the crop ``corner`` ``(y, x)`` in the padded
    image, and whether it is flipped."""

    size: tuple[int, int]
    corner: tuple[int, int]
    flip: bool


def draw_geometry(h: int, w: int, crop_size: int, scale_range: tuple[float, float], geometry: Geometry,
                  rng: np.random.Generator) -> GeometryDraw:
    """Draw, in this order: the size, the crop corner (row, then column), the flip."""
    nh, nw = SCALE_DRAWS[geometry.scale](h, w, float(scale_range[0]), float(scale_range[1]), rng)
    nh, nw = max(1, nh), max(1, nw)
    y0 = int(rng.integers(0, max(nh, crop_size) - crop_size + 1))
    x0 = int(rng.integers(0, max(nw, crop_size) - crop_size + 1))
    return GeometryDraw((nh, nw), (y0, x0), bool(rng.random() < 0.5))


def apply_geometry(image: Tensor, maps: Sequence[tuple[Tensor, int]], draw: GeometryDraw, crop_size: int,
                   geometry: Geometry = PIL_GEOMETRY) -> tuple[Tensor, list[Tensor]]:
    """Resize, pad to the crop, crop and flip a uint8 ``(3, H, W)`` image and its label-like ``maps``.

    ``maps`` are ``(tensor (..., H, W), fill)`` pairs: masks use fill 255 (ignore), a box mask fill 0.
    """
    image = resize_image(image, draw.size, geometry.antialias)
    maps = [(resize_nearest(m, draw.size), fill) for m, fill in maps]
    if draw.flip and geometry.flip == "before_pad":
        image, maps = image.flip(-1), [(m.flip(-1), fill) for m, fill in maps]
    nh, nw = draw.size
    ph, pw = max(crop_size - nh, 0), max(crop_size - nw, 0)
    if ph or pw:
        top, left = (ph // 2, pw // 2) if geometry.pad == "centre" else (0, 0)
        border = (left, pw - left, top, ph - top)
        fill = torch.tensor(geometry.image_fill, dtype=torch.uint8).view(3, 1, 1)
        image = _pad_rgb(image, border, fill)
        maps = [(F.pad(m, border, value=fill_m), fill_m) for m, fill_m in maps]
    (y0, x0), c = draw.corner, crop_size
    image = image[:, y0:y0 + c, x0:x0 + c]
    out_maps = [m[..., y0:y0 + c, x0:x0 + c] for m, _ in maps]
    if draw.flip and geometry.flip == "after_crop":
        image, out_maps = image.flip(-1), [m.flip(-1) for m in out_maps]
    return image.contiguous(), [m.contiguous() for m in out_maps]


def weak_geometry(image: Tensor, maps: Sequence[tuple[Tensor, int]], crop_size: int,
                  scale_range: tuple[float, float], rng: np.random.Generator,
                  geometry: Geometry = PIL_GEOMETRY) -> tuple[Tensor, list[Tensor]]:
    """Rescale, pad to the crop, crop and flip, as the framework's release does (:class:`Geometry`), with one draw
    from ``rng`` (:func:`draw_geometry`)."""
    draw = draw_geometry(image.shape[-2], image.shape[-1], crop_size, scale_range, geometry, rng)
    return apply_geometry(image, maps, draw, crop_size, geometry)


def _pad_rgb(image: Tensor, border: tuple[int, int, int, int], fill: Tensor) -> Tensor:
    left, right, top, bottom = border
    _, h, w = image.shape
    out = fill.expand(3, h + top + bottom, w + left + right).clone()
    out[:, top:top + h, left:left + w] = image
    return out


def resize_image(image: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Bilinear resize of a uint8 ``(3, H, W)`` image (pixel-centre, ``align_corners=False``). With ``antialias`` it
    follows PIL's ``BILINEAR`` (whose filter widens when it shrinks): within 2 grey levels, on 0.3 % of the pixels on
    average over the long sides of a 500 × 375 image (7.9 % at worst; PIL's own resize is about twice as slow)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if antialias:
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def nearest_indices(n_in: int, n_out: int) -> Tensor:
    """Source index of each output pixel of a pixel-centre nearest resize, exactly as PIL's ``NEAREST``:
    ``⌊(j + ½) · n_in / n_out⌋``, accumulated in float64 like PIL's loop (so exact ties fall the same way)."""
    step = n_in / n_out
    offsets = np.full(n_out, step)
    offsets[0] = step * 0.5
    return torch.from_numpy(np.minimum(np.add.accumulate(offsets).astype(np.int64), n_in - 1))


def resize_nearest(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel-centre nearest resize of a label-like map ``(..., H, W)`` (any dtype): PIL's ``NEAREST``, so each
    label stays on the pixel it labels (torch's ``nearest`` samples ``⌊j · in / out⌋`` and shifts labels by about
    half a source pixel)."""
    h, w = m.shape[-2:]
    if (h, w) == tuple(size):
        return m
    return m.index_select(-2, nearest_indices(h, size[0])).index_select(-1, nearest_indices(w, size[1]))


def strong_colour(image: Tensor, rng: np.random.Generator) -> Tensor:
    """UniMatch's strong intensity augmentation of a uint8 ``(3, H, W)`` image, with the released operations:
    torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` (p 0.8, factors in a random order) and ``RandomGrayscale``
    (p 0.2) on a PIL image, then PIL's ``GaussianBlur`` (p 0.5, radius σ ∈ U(0.1, 2)). Only the draws come from
    ``rng``, in this order: the jitter's coin; its brightness, contrast and saturation factors ∈ U(0.5, 1.5) and
    hue factor ∈ U(−0.25, 0.25); the order it applies them in (a permutation of the four); the grey coin; the blur's
    coin; σ. Given them, the output equals the release's pixel for pixel."""
    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    if rng.random() < 0.8:
        factors = [rng.uniform(0.5, 1.5) for _ in range(3)] + [rng.uniform(-0.25, 0.25)]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in rng.permutation(4):
            pil = ops[op](pil, factors[op])
    if rng.random() < 0.2:
        pil = TF.rgb_to_grayscale(pil, num_output_channels=3)
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def cutmix_box(size: int, rng: np.random.Generator, p: float = 0.5,
               area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """``(size, size)`` uint8 mask with one random box (all zeros with probability ``1 - p``).

    As UniMatch's ``obtain_cutmix_box``: the area is drawn once, and only the aspect ratio and the position are
    redrawn until the box fits. Redrawing the area too would reject large areas more often and skew boxes small.
    Draws from ``rng``, in this order: the coin; the area; then the ratio, the column and the row, until it fits.
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
