"""AugSeg (Zhao et al., CVPR 2023): simple augmentations, done right, on a mean teacher.

Per iteration:

1. **Teacher** (EMA, eval mode) on the weak unlabelled view: pseudo-labels ``ŷ``, confidences ``q``, and each
   image's reliability ``ρ_i = mean_pixels((1 − H / log C) · q)`` (``H`` the prediction's entropy; as released).
2. **Random intensity-based augmentation** of the weak view into the strong one: ``k`` ops (``k`` uniform in
   ``1..augseg.num_augs`` = 3, or exactly ``num_augs`` with ``random_num_augs: false``) drawn with replacement from
   the released pool of 11 (identity, autocontrast, equalize, Gaussian blur σ ∈ U(0.1, 2), contrast, brightness,
   colour, sharpness with factors ∈ (0.05, 0.95], posterize to 4-7 bits, solarize at a threshold in 1..255, hue
   shift ∈ ±U(0, 0.5)), each with its magnitude drawn uniformly from its continuous range, per image.
   They run here, on the batch, rather than in a dataset variant: the unlabelled stream is shared by all
   frameworks (its strong views are UniMatch's), the ops are cheap on crop-sized images, and the draws come from the
   framework's checkpointed generator, so a resumed run replays them. The weak view is de-normalised to exact
   ``uint8`` (it was normalised from ``uint8``), augmented, and normalised again. Each op equals the released PIL
   operation pixel for pixel (:func:`apply_intensity_ops`: PIL's arithmetic on tensors, on the batch's device;
   torchvision's ops where they already equal PIL's): PIL's Gaussian blur is three box blurs, its contrast and
   colour blend with PIL's integer luma and truncate, its hue shift goes through 8-bit HSV.
3. **Adaptive label-aided CutMix** (with probability ``augseg.cutmix_prob``, 1.0): a random permutation ``π``; a
   labelled box of area ``1 − λ_l``, ``λ_l ~ Beta(8, 2)``, and an unlabelled box of area ``1 − λ_u``,
   ``λ_u ~ Beta(4, 4)`` (one size per batch, centres uniform in ``[S/8, S)`` per image, clipped, as released);
   image ``i`` takes the labelled box from labelled image ``π(i)`` with probability ``1 − ρ_i`` (less reliable
   images get ground truth more often: its labels, confidence 1), then the unlabelled box from the result for
   image ``π(i)``. Pixels from labelled images carry their ground truth (255 stays ignored) and ``W = 1``: ``W``
   re-weights pseudo-labels only, ground truth keeps the framework's own weight.
4. **Student** on ``cat(x, u_s)``, or ``cat(x, u_w, u_s)`` with ``augseg.extra_weak`` (the weak view's predictions
   are unused: it only enters the BatchNorm statistics; off in the released training logs' configs, on in the
   repository's ``exps/`` VOC configs).
5. ``loss = L_x + augseg.unsup_weight · L_u`` (``L_x``: ``loss.labelled``, CE as released on VOC, OHEM on
   Cityscapes) with the **thresholded CE** against the teacher,
   ``L_u = Σ_i [q_i ≥ τ] m_i ℓ_i / N`` (``τ = augseg.threshold`` = 0.95). **Normaliser**: ``N`` = all pixels of
   the unlabelled batch (the released ``loss.mean()`` over a map with ignored pixels set to zero); ignored pixels
   (padding, labelled 255) carry no loss (the padding is a departure: see below). With the weighting on:
   ``Σ W [q ≥ τ] m ℓ / N`` (``normalize: count``) or ``/ Σ_i W_i`` over the non-ignored pixels
   (``normalize: weight``).
6. EMA after the optimiser step: the teacher *copies* the student (decay 0) during the first
   ``augseg.teacher_copy_iterations`` (null = one epoch, the released ``epoch > sup_only_epoch`` rule with
   ``sup_only_epoch: 0``), then decays with ``min(1 − 1/(t + 1), augseg.ema_decay)`` (0.999 on VOC).

The teacher is what is evaluated (the released code reports the teacher). Weights and buffers are EMA'd (as
released). With the weighting on, ``W`` comes from the teacher's weak-view features; the bank's labelled pixels
come from a teacher pass over the labelled batch (only then).

**Data, as released** (``augs_TIBA.py``: ``Resize``, ``RandomFlip``, ``Crop`` for both streams;
tests/data/test_released_pipelines.py): the flip comes before the crop, so the padding (``np.uint8(255 · ImageNet
mean)`` = (123, 116, 103), ignore 255) stays bottom / right (``AugSeg.traits.geometry``); masks, box masks and the
padding region equal the release's exactly, given the same draws. Departures, measured:

- the weak image is torch's antialiased bilinear, not PIL's ``BILINEAR``: at most 2 grey levels apart, on 0.3 % of
  the pixels on average over the scale draws (7.9 % at worst);
- the long side is drawn around the image's own long side ``L`` (``int(L/2) .. 2L``) where the release draws it
  around ``resize_base_size`` (500 on VOC): the same for a 500-pixel long side (VOC's usual size); for another
  ``L`` the release's factor is ``250/L .. 1000/L`` of that image;
- on Cityscapes the release draws a continuous factor ``s`` and resizes to ``(int(1024 s), int(2048 s))``; hafis
  draws the long side ``k`` and rounds the short one, ``int(k/2 + ½)``: the same long sides, the short side one row
  longer when ``k`` is odd (half the draws), a vertical stretch of at most 0.2 %;
- the unlabelled padding is ignored; the release discards the unlabelled label, so its padding (22.8 % of an
  unlabelled VOC crop on average, 500 × 375 images at crop 513; 3.4 % on Cityscapes at 800) takes pseudo-labels
  and trains where the teacher is confident;
- the draws come from the sample's and the framework's generators in hafis's order (the crop's row before its
  column, the flip last), not from ``random`` / ``numpy`` (the flip, then the column, then the row): the same
  distributions.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from hafis.config import Config
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Geometry

from .base import FrameworkContext, LabelledBatch, StepOutput, UnlabelledBatch
from .losses import labelled_loss
from .mixing import paste
from .teacher import MeanTeacherFramework, softmax_entropy

#: the released pool (``get_augment_list(flag_using_wide=False)``) and each op's magnitude range
INTENSITY_OPS: dict[str, Optional[tuple[float, float]]] = {
    "identity": None,
    "autocontrast": None,
    "equalize": None,
    "blur": (0.1, 2.0),
    "contrast": (0.05, 0.95),
    "brightness": (0.05, 0.95),
    "color": (0.05, 0.95),
    "sharpness": (0.05, 0.95),
    "posterize": (4, 8),
    "solarize": (1, 256),
    "hue": (0.0, 0.5),
}
OP_NAMES = tuple(INTENSITY_OPS)


def _u(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


def sample_intensity_ops(generator: torch.Generator, num_augs: int = 3,
                         random_num: bool = True) -> list[tuple[str, Optional[float]]]:
    """Draw one image's ops: ``[(name, magnitude), ...]`` as the released ``strong_img_aug`` does.

    Magnitudes: blur σ = U(0.1, 2.0); contrast / brightness / color / sharpness factor = 0.95 − 0.9 U ∈ (0.05, 0.95];
    posterize bits = 8 − max(1, ⌈4 U⌉) ∈ {4..7}; solarize threshold = 256 − max(1, ⌈255 U⌉) ∈ {1..255};
    hue = ±U(0, 0.5). Identity, autocontrast and equalize have none.
    """
    if not 1 <= num_augs <= len(OP_NAMES):
        raise ValueError(f"num_augs must be in 1..{len(OP_NAMES)}, got {num_augs}")
    k = int(torch.randint(1, num_augs + 1, (1,), generator=generator)) if random_num else num_augs
    names = [OP_NAMES[i] for i in torch.randint(len(OP_NAMES), (k,), generator=generator).tolist()]
    ops: list[tuple[str, Optional[float]]] = []
    for name in names:
        rng = INTENSITY_OPS[name]
        if rng is None:
            ops.append((name, None))
        elif name == "blur":
            ops.append((name, rng[0] + (rng[1] - rng[0]) * _u(generator)))
        elif name in ("contrast", "brightness", "color", "sharpness"):
            ops.append((name, rng[1] - (rng[1] - rng[0]) * _u(generator)))
        elif name in ("posterize", "solarize"):
            v = max(1, math.ceil((rng[1] - rng[0]) * _u(generator)))
            ops.append((name, float(rng[1] - v)))
        else:  # hue
            v = rng[0] + (rng[1] - rng[0]) * _u(generator)
            ops.append((name, -v if _u(generator) < 0.5 else v))
    return ops


def pil_luma(image: Tensor) -> Tensor:
    """PIL's ``RGB -> L`` of a ``uint8`` ``(3, H, W)`` image: ``(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16``, int32."""
    r, g, b = image.to(torch.int32).unbind(-3)
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _div(a: Tensor, b) -> Tensor:
    """``a / b`` correctly rounded, as C divides: ``b`` as a tensor on ``a``'s device (torch turns a division by a
    Python number into a multiplication by its reciprocal on CUDA, and ``number / tensor`` everywhere)."""
    return a / torch.as_tensor(b, dtype=a.dtype, device=a.device)


def pil_autocontrast(image: Tensor) -> Tensor:
    """``ImageOps.autocontrast``: each channel stretched from its own ``lo .. hi`` to ``0 .. 255`` through PIL's
    lookup table, ``int(i · s − lo · s)`` with ``s = 255 / (hi − lo)`` in double (a flat channel unchanged)."""
    lo = image.amin(dim=(-2, -1)).double()[..., None]
    hi = image.amax(dim=(-2, -1)).double()[..., None]
    flat = hi <= lo
    scale = _div(torch.full_like(lo, 255.0), torch.where(flat, 1.0, hi - lo))
    levels = torch.arange(256, dtype=torch.float64, device=image.device)
    lut = torch.where(flat, levels, (levels * scale + (-lo) * scale).trunc().clamp(0, 255)).to(torch.uint8)
    return lut.gather(-1, image.flatten(-2).to(torch.int64)).view_as(image)


def pil_blend(degenerate: Tensor, image: Tensor, factor: float) -> Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` (what ``ImageEnhance`` computes): in float32,
    ``d + f · (i − d)``, clipped and truncated to ``uint8``."""
    d = degenerate.float()
    return (d + float(np.float32(factor)) * (image.float() - d)).clamp(0, 255).to(torch.uint8)


def pil_contrast(image: Tensor, factor: float) -> Tensor:
    """``ImageEnhance.Contrast``: a blend with the grey of the image's mean luma, rounded to an integer."""
    mean = (_div(pil_luma(image).sum().double(), float(image.shape[-1] * image.shape[-2])) + 0.5).floor()
    return pil_blend(mean.float().expand_as(image), image, factor)


def pil_color(image: Tensor, factor: float) -> Tensor:
    """``ImageEnhance.Color``: a blend with the image's own luma (PIL's integer ``L``)."""
    return pil_blend(pil_luma(image).unsqueeze(-3).expand_as(image), image, factor)


#: PIL's ``ImageFilter.SMOOTH`` kernel weights as its C filter holds them (float32 ``1 / 13`` and ``5 / 13``)
_SMOOTH_EDGE, _SMOOTH_CENTRE = float(np.float32(1) / np.float32(13)), float(np.float32(5) / np.float32(13))


def pil_smooth(image: Tensor) -> Tensor:
    """``image.filter(ImageFilter.SMOOTH)`` of a ``uint8`` ``(3, H, W)`` image, exactly: PIL's float32 sums in its
    order (row below, centre row, row above; each row left to right), plus ½, truncated; the border pixels (and an
    image under 3 × 3) unchanged. Elementwise, so no convolution precision mode (TF32) can change it."""
    if image.shape[-1] < 3 or image.shape[-2] < 3:
        return image
    x = image.float()

    def row(r: Tensor, centre: float) -> Tensor:
        return (r[..., :-2] * _SMOOTH_EDGE + r[..., 1:-1] * centre) + r[..., 2:] * _SMOOTH_EDGE

    ss = 0.5 + row(x[..., 2:, :], _SMOOTH_EDGE)
    ss = ss + row(x[..., 1:-1, :], _SMOOTH_CENTRE)
    ss = ss + row(x[..., :-2, :], _SMOOTH_EDGE)
    out = image.clone()
    out[..., 1:-1, 1:-1] = ss.clamp(0, 255).to(torch.uint8)
    return out


def pil_sharpness(image: Tensor, factor: float) -> Tensor:
    """``ImageEnhance.Sharpness``: a blend with the :func:`pil_smooth` image."""
    return pil_blend(pil_smooth(image), image, factor)


def _f32(x: float) -> np.float32:
    return np.float32(x)


def pil_box_radius(sigma: float, passes: int = 3) -> float:
    """The box radius PIL's ``GaussianBlur(radius=sigma)`` uses for each of its ``passes`` box blurs
    (``_gaussian_blur_radius`` in libImaging/BoxBlur.c, float32 where C uses float, double where it uses double)."""
    radius = _f32(sigma)
    sigma2 = _f32(radius * radius / _f32(passes))
    big_l = _f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = _f32(math.floor((float(big_l) - 1.0) / 2.0))
    a = _f32(_f32(2) * small_l + _f32(1)) * _f32(small_l * _f32(small_l + _f32(1)) - _f32(3) * sigma2)
    a = _f32(a / _f32(_f32(6) * _f32(sigma2 - _f32(small_l + _f32(1)) * _f32(small_l + _f32(1)))))
    return float(_f32(small_l + a))


def _box_pass(x: Tensor, radius: int, ww: int, fw: int) -> Tensor:
    """One PIL box-blur pass along the last dim of an int64 tensor: edge pixels repeated, the window
    ``x−r .. x+r`` weighted ``ww`` and the two pixels just outside it ``fw``, in 8.24 fixed point, rounded."""
    n = x.shape[-1]
    ext = x.index_select(-1, torch.arange(-radius - 1, n + radius + 1, device=x.device).clamp(0, n - 1))
    acc = ext[..., 1:1 + n].clone()
    for k in range(2, 2 * radius + 2):
        acc += ext[..., k:k + n]
    far = ext[..., :n] + ext[..., 2 * radius + 2:2 * radius + 2 + n]
    return (acc * ww + far * fw + (1 << 23)) >> 24


def pil_gaussian_blur(image: Tensor, sigma: float, passes: int = 3) -> Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` of a ``uint8`` ``(..., H, W)`` image, exactly: ``passes``
    box blurs of the radius :func:`pil_box_radius` along the rows, then as many along the columns, each rounded to
    ``uint8`` as PIL's are."""
    r = pil_box_radius(sigma, passes)
    if r == 0:
        return image
    radius = int(r)
    ww = int(_f32(1 << 24) / _f32(_f32(r) * _f32(2) + _f32(1)))
    fw = ((1 << 24) - (radius * 2 + 1) * ww) // 2
    x = image.to(torch.int64)
    for _ in range(passes):
        x = _box_pass(x, radius, ww, fw)
    x = x.transpose(-1, -2)
    for _ in range(passes):
        x = _box_pass(x, radius, ww, fw)
    return x.transpose(-1, -2).to(torch.uint8).contiguous()


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round`` for non-negative ``x``."""
    fl = x.floor()
    return fl + (x - fl >= 0.5).to(x.dtype)


def pil_rgb_to_hsv(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PIL's ``convert("HSV")`` (``rgb2hsv_row`` in libImaging/Convert.c) of a ``uint8`` ``(3, H, W)`` image:
    ``H``, ``S``, ``V`` each quantised to 0..255 (``H`` = ⌊255 · hue⌋), int64."""
    r, g, b = image.to(torch.int64).unbind(-3)
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    cr = (maxc - minc).float()
    s = cr / maxc.float()
    rc, gc, bc = ((maxc - c).float() / cr for c in (r, g, b))
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, (2.0 + rc.double() - bc.double()).float(),
                                                    (4.0 + gc.double() - rc.double()).float()))
    h = torch.fmod(_div(h.double(), 6.0) + 1.0, 1.0).float()
    grey = maxc == minc
    uh = torch.where(grey, 0, (h.double() * 255.0).trunc().clamp(0, 255).to(torch.int64))
    us = torch.where(grey, 0, (s.double() * 255.0).trunc().clamp(0, 255).to(torch.int64))
    return uh, us, maxc


#: for each sextant ``i`` of the hue circle, which of (v, p, q, t) PIL's ``hsv2rgb`` writes to R, G and B
_HSV_SEXTANTS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def pil_hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """PIL's ``HSV -> RGB`` (``hsv2rgb`` in libImaging/Convert.c) of integer ``(H, W)`` planes: ``uint8``
    ``(3, H, W)``."""
    x6 = _div(h.double() * 6.0, 255.0)
    i = x6.floor()
    f = (x6 - i).float()
    fs = _div(s.double(), 255.0).float()
    vd = v.double()
    p = _round_half_away(vd * (1.0 - fs.double()))
    q = _round_half_away(vd * (1.0 - (fs * f).double()))
    t = _round_half_away(vd * (1.0 - fs.double() * (1.0 - f.double())))
    candidates = torch.stack([vd, p, q, t]).clamp(0, 255).to(torch.uint8)
    table = torch.tensor(_HSV_SEXTANTS, device=h.device)
    pick = table[i.to(torch.int64) % 6].permute(2, 0, 1)
    rgb = candidates.gather(0, pick)
    return torch.where(s == 0, v.to(torch.uint8), rgb)


def released_hue_shift(image: Tensor, hue_factor: float) -> Tensor:
    """AugSeg's ``img_aug_hue`` with PIL's HSV: ``H += uint8(hue_factor · 255)`` (truncated toward zero, wrapped
    modulo 256, as numpy casts it on x86), then back to RGB."""
    h, s, v = pil_rgb_to_hsv(image)
    return pil_hsv_to_rgb((h + int(hue_factor * 255)) % 256, s, v)


def apply_intensity_ops(image: Tensor, ops: list[tuple[str, Optional[float]]]) -> Tensor:
    """Apply ``ops`` to one ``uint8`` image ``(3, H, W)``, each as the released PIL operation computes it, pixel
    for pixel, on the image's device: torchvision's tensor ops where they already equal PIL's (equalize,
    brightness, posterize, solarize: integer or single float32 products), PIL's own arithmetic transcribed onto
    tensors for the others (autocontrast, blur, contrast, colour, sharpness, hue)."""
    for name, v in ops:
        if name == "identity":
            continue
        if name == "autocontrast":
            image = pil_autocontrast(image)
        elif name == "equalize":
            image = TF.equalize(image)
        elif name == "blur":
            image = pil_gaussian_blur(image, v)
        elif name == "contrast":
            image = pil_contrast(image, v)
        elif name == "brightness":
            image = TF.adjust_brightness(image, v)
        elif name == "color":
            image = pil_color(image, v)
        elif name == "sharpness":
            image = pil_sharpness(image, v)
        elif name == "posterize":
            image = TF.posterize(image, int(v))
        elif name == "solarize":
            image = TF.solarize(image, float(v))
        elif name == "hue":
            image = released_hue_shift(image, v)
        else:
            raise ValueError(f"unknown intensity op {name!r}")
    return image


def to_uint8(images: Tensor) -> Tensor:
    """Undo :func:`hafis.data.transforms.normalize` on a batch ``(B, 3, H, W)`` (exact for normalised uint8)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def image_reliability(prob: Tensor) -> Tensor:
    """``(B,)``: ``mean((1 − H / log C) · max p)`` over each image's pixels (AugSeg's confidence score)."""
    conf = prob.max(dim=1).values
    entropy = softmax_entropy(prob) / math.log(prob.shape[1])
    return ((1.0 - entropy) * conf).mean(dim=(1, 2))


def rand_boxes(batch: int, height: int, width: int, lam: float, generator: torch.Generator) -> Tensor:
    """The released ``rand_bbox``: one size ``(⌊H·√(1−λ)⌋, ⌊W·√(1−λ)⌋)``, a centre per image uniform in
    ``[S/8, S)`` on each axis, the box clipped to the image; ``(B, H, W)`` bool."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = torch.randint(int(height / 8), height, (batch,), generator=generator).tolist()
    cx = torch.randint(int(width / 8), width, (batch,), generator=generator).tolist()
    boxes = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(batch):
        y0, y1 = max(cy[i] - ch // 2, 0), min(cy[i] + ch // 2, height)
        x0, x1 = max(cx[i] - cw // 2, 0), min(cx[i] + cw // 2, width)
        boxes[i, y0:y1, x0:x1] = True
    return boxes


def label_aided_cutmix(u: dict[str, Tensor], lab: dict[str, Tensor], take_labelled: Tensor, perm: Tensor,
                       box_l: Tensor, box_u: Tensor) -> dict[str, Tensor]:
    """The released ``cut_mix_label_adaptive`` on dicts of per-image maps with the same keys (``image`` is
    ``(B, 3, H, W)``, the others ``(B, H, W)``): image ``i`` takes ``box_l[i]`` from labelled ``π(i)`` when
    ``take_labelled[i]``, then every image ``i`` takes ``box_u[i]`` from the (possibly labelled-mixed) image ``π(i)``.
    """
    first = {k: paste(v, lab[k][perm], box_l & take_labelled[:, None, None]) for k, v in u.items()}
    return {k: paste(v, first[k][perm], box_u) for k, v in u.items()}


class AugSeg(MeanTeacherFramework):
    name = "augseg"
    #: the released ``Crop`` pads with ``np.uint8(255 · ImageNet mean)`` = (123, 116, 103), bottom and right
    traits = replace(MeanTeacherFramework.traits, geometry=Geometry(image_fill=(123, 116, 103), flip="before_pad"),
                     strong_views=False)

    def __init__(self, config: Config, model: nn.Module, ctx: FrameworkContext) -> None:
        super().__init__(config, model, ctx)

    def teacher_copy_iterations(self) -> int:
        n = self.config.augseg.teacher_copy_iterations
        return self.epoch_length() if n is None else n

    def after_optimizer_step(self, iteration: int) -> None:
        decay = 0.0 if iteration < self.teacher_copy_iterations() else \
            self.teacher.warmup_decay(iteration, self.config.augseg.ema_decay)
        self.update_teacher(decay)

    def strong_view(self, weak: Tensor) -> Tensor:
        cfg = self.config.augseg
        images = to_uint8(weak)
        out = [apply_intensity_ops(img, sample_intensity_ops(self.generator, cfg.num_augs, cfg.random_num_augs))
               for img in images]
        return from_uint8(torch.stack(out))

    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        cfg = self.config.augseg
        x, y = labelled["image"], labelled["mask"]
        u_w, ignore = unlabelled["weak"], unlabelled["ignore"]
        n_l, n_u = x.shape[0], u_w.shape[0]

        with torch.no_grad():
            out_t = self.teacher(u_w)
            prob = out_t.logits.softmax(dim=1)
            conf, pseudo = prob.max(dim=1)
            reliability = image_reliability(prob)
            w = None
            if self.weighting.enabled:
                out_tl = self.teacher(x)
                self.weighting.update(out_tl.features, out_tl.logits, y, out_t.features, conf, pseudo, ignore,
                                      unlabelled.get("box_mask"))
                w = self.weighting.weights(out_t.features, pseudo, conf)
        u_s = self.strong_view(u_w)

        maps = {"image": u_s, "target": pseudo, "conf": conf, "ignore": ignore}
        if w is not None:
            maps["weight"] = w
        if cfg.cutmix and float(self.rand(1)) < cfg.cutmix_prob:
            if n_l != n_u:
                raise ValueError("augseg's label-aided CutMix pairs labelled and unlabelled images: "
                                 f"train.batch_size ({n_l}) must equal train.unlabelled_batch_size ({n_u})")
            h, wd = u_w.shape[-2:]
            perm = torch.randperm(n_u, generator=self.generator)
            lam_l = float(np.random.default_rng(int(self.randint(0, 2**31 - 1, 1))).beta(8, 2))
            lam_u = float(np.random.default_rng(int(self.randint(0, 2**31 - 1, 1))).beta(4, 4))
            box_l = rand_boxes(n_u, h, wd, lam_l, self.generator)
            box_u = rand_boxes(n_u, h, wd, lam_u, self.generator)
            take = self.rand(n_u) > reliability.cpu()  # released: random() > confidence
            lab = {"image": x, "target": y, "conf": torch.ones_like(conf), "ignore": torch.zeros_like(ignore)}
            if w is not None:
                lab["weight"] = torch.ones_like(w)
            dev = u_w.device
            maps = label_aided_cutmix(maps, lab, take.to(dev), perm.to(dev), box_l.to(dev), box_u.to(dev))

        views = [x, u_w, maps["image"]] if cfg.extra_weak else [x, maps["image"]]
        out = self.model(torch.cat(views))
        pred_x, pred_s = out.logits[:n_l], out.logits[-n_u:]
        loss_x = labelled_loss(pred_x, None if out.aux is None else out.aux[:n_l], y, self.config)

        target = maps["target"]
        valid = (maps["ignore"] != 255) & (target != 255)
        keep = (maps["conf"] >= cfg.threshold) & valid
        # normaliser: every pixel (released, count), or Σ W over the non-ignored pixels (normalize: weight)
        by_weight = "weight" in maps and self.weighting.config.normalize == "weight"
        loss_u = self.weighting.loss(pred_s, target.masked_fill(target == 255, 0), maps.get("weight"), keep,
                                     valid if by_weight else torch.ones_like(keep))
        loss = loss_x + cfg.unsup_weight * loss_u
        terms = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                 "mask_ratio": keep.float().mean(), "reliability": reliability.mean()}
        if "weight" in maps:
            terms["weight_mean"] = (maps["weight"] * keep).sum() / keep.sum().clamp_min(1)
        return StepOutput(loss, terms)
