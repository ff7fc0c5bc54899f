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
   ``uint8`` (it was normalised from ``uint8``), augmented with torchvision's functional ops, and normalised again.
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
   (padding, labelled 255) carry no loss. With the weighting on: ``Σ W [q ≥ τ] m ℓ / N`` (``normalize: count``)
   or ``/ Σ_i W_i`` over the non-ignored pixels (``normalize: weight``).
6. EMA after the optimiser step: the teacher *copies* the student (decay 0) during the first
   ``augseg.teacher_copy_iterations`` (null = one epoch, the released ``epoch > sup_only_epoch`` rule with
   ``sup_only_epoch: 0``), then decays with ``min(1 − 1/(t + 1), augseg.ema_decay)`` (0.999 on VOC).

The teacher is what is evaluated (the released code reports the teacher). Weights and buffers are EMA'd (as
released). With the weighting on, ``W`` comes from the teacher's weak-view features; the bank's labelled pixels
come from a teacher pass over the labelled batch (only then).
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


def apply_intensity_ops(image: Tensor, ops: list[tuple[str, Optional[float]]]) -> Tensor:
    """Apply ``ops`` to one ``uint8`` image ``(3, H, W)``."""
    for name, v in ops:
        if name == "identity":
            continue
        if name == "autocontrast":
            image = TF.autocontrast(image)
        elif name == "equalize":
            image = TF.equalize(image)
        elif name == "blur":
            k = 2 * math.ceil(3 * v) + 1
            image = TF.gaussian_blur(image, kernel_size=[k, k], sigma=[v, v])
        elif name == "contrast":
            image = TF.adjust_contrast(image, v)
        elif name == "brightness":
            image = TF.adjust_brightness(image, v)
        elif name == "color":
            image = TF.adjust_saturation(image, v)
        elif name == "sharpness":
            image = TF.adjust_sharpness(image, v)
        elif name == "posterize":
            image = TF.posterize(image, int(v))
        elif name == "solarize":
            image = TF.solarize(image, float(v))
        elif name == "hue":
            image = TF.adjust_hue(image, v)
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
    traits = replace(MeanTeacherFramework.traits, geometry=Geometry(image_fill=(123, 116, 103)))

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
                w = self.weighting.weights(out_t.features, pseudo)
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
