"""AEL (Hu et al., NeurIPS 2021): adaptive equalization learning on a mean teacher.

Everything adaptive reads one **confidence bank** ``conf ∈ [0, 1]^C``: after the student's forward pass, the
category confidence of class ``c`` (the mean student probability of ``c`` over the labelled pixels labelled ``c``;
0 for a class absent from the batch, as released) enters ``conf ← m · conf + (1 − m) · conf_batch`` with
``m = ael.momentum`` (0.999). The bank starts uniform-random per class (the released ``torch.rand``) or at
``ael.confidence_init``.

Per iteration:

1. **Adaptive Copy-Paste** (labelled): ``ael.copy_paste_classes`` draws (with replacement) from the classes not in
   ``ael.paste_exclude`` with probabilities ``softmax(sqrt(1 − conf))``; each labelled image, with probability
   ``ael.copy_paste_prob``, gets every pixel of the drawn classes pasted from the next labelled image of the batch
   (image and label). The released code pastes from a separately loaded labelled image rescaled by 0.1-2.0 and
   hard-codes Cityscapes' stuff classes as the excluded ones even on VOC; hafis pastes within the batch and takes
   the excluded classes from the config (default: class 0, background).
2. **Teacher** (EMA, eval mode) on the labelled and on the weak unlabelled images.
3. **Adaptive CutMix** (unlabelled): each unlabelled image ``i`` draws a class ``c`` with probabilities
   ``softmax(1 − conf)`` and takes, from another image ``j`` of the batch whose teacher prediction covers at
   least ``ael.area_thresh`` of the image with ``c``, the bounding box of a random connected component of ``c``
   larger than that (the released VOC setting, ``no_pad`` / ``no_slim``); when no image qualifies, a random box of
   half the area (the released ``init_cutmix``) from image ``i + 1``. The released code keeps a dataset-wide bank
   of which unlabelled image holds which class and loads the sampled image; hafis samples within the batch. The
   teacher's logits, the ignore mask and ``W`` follow the box.
4. **Student** on the pasted labelled images and (separately, as released) on the mixed unlabelled images;
   supervised CE; the confidence bank update.
5. **Consistency losses** against the teacher's pseudo-labels, on the labelled images and on the unlabelled ones,
   each ``Σ_i r_i m_i ℓ_i / Σ_i r_i`` with

   * ``m_i = [q_i ≥ ael.threshold]`` (0.7) and not ignored,
   * **dynamic re-weighting** ``r_i = q_i^γ · s_i`` (``γ = ael.gamma`` = 2: a focal-like down-weighting of
     low-confidence pseudo-labels; ``q_i`` the teacher's confidence),
   * **adaptive equalization sampling** ``s_i ~ Bernoulli(ρ_{k_i})`` with ``ρ_c = ((1 − conf_c) / max_c'(1 −
     conf_c'))^ael.sample_gamma`` and ``k_i`` the *student's* predicted class (as released).

   **Normaliser**: ``Σ_i r_i`` over all pixels, including those below the threshold (as released; ignored
   padding pixels carry no loss but count; the released code has no padding mask, see "Data, as released").
   With the weighting on, ``W`` multiplies the unlabelled term's per-pixel loss after AEL's own sampling and
   re-weighting: ``Σ W r m ℓ / Σ r`` (``normalize: count``) or ``/ Σ W r`` (``normalize: weight``); the
   labelled-image consistency term is unchanged (its pixels have ground truth).
6. ``loss = L_x + ael.unsup_weight · (L_cons(labelled) + L_cons(unlabelled))``; after the optimiser step the
   teacher takes the EMA with ``min(1 − 1/(t + 1), ael.ema_decay)``.

The teacher is what is evaluated (as released). The supervised term is
:func:`~hafis.frameworks.losses.labelled_loss` (released: OHEM, ``loss.labelled: ohem``, plus 0.4 times OHEM on
the auxiliary head of ``model.decoder: released``, ``model.aux_weight: 0.4``). With the weighting off, one step's
terms and gradients equal a transcription of the released step given the same pasted batch, boxes and partners
(``tests/frameworks/test_ael_released.py``). Deviations: the in-batch partners above; the teacher runs in eval mode
(released: train mode; see :mod:`hafis.frameworks.teacher`); equalization sampling draws one uniform per pixel
(released: one map per class shared by a GPU's images). The released losses are divided by the world size before
DDP averages the gradients (an 8x smaller step on its 8 GPUs): the paper configs divide the learning rate instead.

**Data, as released** (:data:`~hafis.data.transforms.TENSOR_GEOMETRY`; ``tests/data/test_released_tensor_pipelines.py``
compares both streams' samples pixel by pixel with a transcription of ``semseg/dataset/augmentation.py``, U2PL's
code, on 500x375 and 2048x1024 images): normalise, rescale by a factor drawn half the time in [0.5, 1) and half in
[1, 2) (sides truncated), flip, pad around the image to the crop (513 VOC, 769 Cityscapes), crop at random; no
blur, no rotation (the released configs). Departures, with their measured sizes:

* labels are resized pixel-centre (PIL ``NEAREST``); the release's torch ``nearest`` puts them about half a source
  pixel up and left of their pixels: 0.3-1.6 % of a crop's labelled pixels differ (a VOC-like mask; all on label
  boundaries);
* padding is ignored (255). The released ``Crop`` labels it 0 (background) in the labelled crops, and ``train.py``
  drops the unlabelled labels, so unlabelled padding carries the consistency loss of its pseudo-labels. Padding is
  on average 31.8 % of a VOC crop over the scale draw (68 % of the crops have some) and 4.2 % of a Cityscapes crop
  (25 %);
* images are resized as uint8 (rounded) and padded with the uint8 mean colour (124, 116, 104) rather than the exact
  mean (0 after the release's ``Normalize``): at most half a grey level, 0.0088 in normalised units (0.0082 on the
  padding);
* evaluation follows ``eval`` (VOC whole image; Cityscapes 769 windows at stride 512, one scale). The released
  train-time validation scores a centre crop: 513 on VOC, its padding labelled background; 769 on Cityscapes, the
  image's centre only. ``eval.py`` slides 769 windows at stride 513 over six scales (0.5-2.0) by default.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from hafis.config import Config
from hafis.data.transforms import TENSOR_GEOMETRY

from .base import FrameworkContext, LabelledBatch, StepOutput, UnlabelledBatch
from .losses import labelled_loss
from .mixing import partner_index, paste
from .teacher import MeanTeacherFramework


def paste_class_probabilities(conf: Tensor) -> Tensor:
    """Adaptive Copy-Paste's class distribution: ``softmax(sqrt(1 − conf))``."""
    return torch.softmax((1.0 - conf).clamp_min(0).sqrt(), dim=0)


def cutmix_class_probabilities(conf: Tensor) -> Tensor:
    """Adaptive CutMix's class distribution: ``softmax(1 − conf)``."""
    return torch.softmax(1.0 - conf, dim=0)


def equalization_rates(conf: Tensor, power: float = 1.0) -> Tensor:
    """Adaptive equalization sampling rates ``ρ_c = ((1 − conf_c) / (max(1 − conf) + 1e-12))^power``."""
    d = 1.0 - conf
    return (d / (d.max() + 1e-12)).pow(power)


def category_confidence(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(C,)``: the mean predicted probability of class ``c`` over the pixels labelled ``c``; 0 where none."""
    prob = logits.detach().softmax(dim=1)
    one_hot = F.one_hot(labels.clamp_max(num_classes).flatten(), num_classes + 1)[:, :num_classes].float()
    flat = prob.permute(0, 2, 3, 1).reshape(-1, num_classes)
    counts = one_hot.sum(dim=0)
    sums = (flat * one_hot).sum(dim=0)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))


def random_half_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """The released ``init_cutmix``: area ``H·W/2``, ``y_prop = 0.5^U``, ``x_prop = 0.5 / y_prop``, uniform position."""
    y_prop = float(np.exp(float(torch.rand(1, generator=generator)) * np.log(0.5)))
    x_prop = 0.5 / y_prop
    h, w = int(round(y_prop * height)), int(round(x_prop * width))
    y0 = int(round((height - h) * float(torch.rand(1, generator=generator))))
    x0 = int(round((width - w) * float(torch.rand(1, generator=generator))))
    return y0, x0, y0 + h, x0 + w


def component_box(mask: np.ndarray, min_area: float, generator: torch.Generator) -> Optional[tuple[int, int, int, int]]:
    """Bounding box ``(y0, x0, y1, x1)`` of a random connected component of ``mask`` with more than ``min_area``
    pixels (components visited in a random order, the first large enough wins); ``None`` if there is none."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    slices = ndimage.find_objects(labels)
    for k in torch.randperm(n, generator=generator).tolist():
        if sizes[k + 1] > min_area:
            s = slices[k]
            return s[0].start, s[1].start, s[0].stop, s[1].stop
    return None


class AEL(MeanTeacherFramework):
    name = "ael"
    traits = replace(MeanTeacherFramework.traits, geometry=TENSOR_GEOMETRY, strong_views=False)

    def __init__(self, config: Config, model: nn.Module, ctx: FrameworkContext) -> None:
        super().__init__(config, model, ctx)
        num_classes = ctx.num_classes
        init = config.ael.confidence_init
        self.confidence = (torch.rand(num_classes, generator=self.generator) if init is None
                           else torch.full((num_classes,), float(init)))
        bad = [c for c in config.ael.paste_exclude if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"ael.paste_exclude: class indices {bad} are not in 0..{num_classes - 1}")
        self.paste_classes = torch.tensor([c for c in range(num_classes) if c not in config.ael.paste_exclude],
                                          dtype=torch.long)

    # ------------------------------------------------------------------------------------------ plumbing
    def to(self, device: torch.device) -> "AEL":
        super().to(device)
        self.confidence = self.confidence.to(device)
        return self

    def state_dict(self) -> dict:
        return {**super().state_dict(), "confidence": self.confidence.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.confidence = state["confidence"].to(self.confidence.device)

    def after_optimizer_step(self, iteration: int) -> None:
        self.update_teacher(self.teacher.warmup_decay(iteration, self.config.ael.ema_decay))

    # ------------------------------------------------------------------------------------ augmentation
    def copy_paste(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive Copy-Paste (step 1)."""
        cfg = self.config.ael
        if not cfg.copy_paste or self.paste_classes.numel() == 0:
            return x, y
        probs = paste_class_probabilities(self.confidence.cpu()[self.paste_classes])
        draws = torch.multinomial(probs, cfg.copy_paste_classes, replacement=True, generator=self.generator)
        query = self.paste_classes[draws].unique().to(y.device)
        chosen = self.rand(x.shape[0], device=x.device) < cfg.copy_paste_prob
        src = partner_index(x.shape[0], x.device)
        alpha = torch.isin(y[src], query) & chosen[:, None, None]
        return paste(x, x[src], alpha), paste(y, y[src], alpha)

    def cutmix_boxes(self, pred: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive CutMix (step 3) from the teacher's predictions ``(B, H, W)``: the box mask ``(B, H, W)`` and the
        image each box comes from ``(B,)``."""
        cfg = self.config.ael
        b, h, w = pred.shape
        classes = torch.multinomial(cutmix_class_probabilities(self.confidence.cpu()), b, replacement=True,
                                    generator=self.generator).tolist()
        pred_np = pred.cpu().numpy()
        min_area = cfg.area_thresh * h * w
        boxes = torch.zeros(b, h, w, dtype=torch.bool)
        source = partner_index(b, torch.device("cpu")).clone()
        for i, c in enumerate(classes):
            found = None
            if cfg.adaptive_cutmix:
                cands = [j for j in range(b) if j != i and (pred_np[j] == c).sum() >= min_area]
                if cands:
                    j = cands[int(torch.randint(len(cands), (1,), generator=self.generator))]
                    source[i] = j
                    found = component_box(pred_np[j] == c, min_area, self.generator)
            y0, x0, y1, x1 = found if found is not None else random_half_box(h, w, self.generator)
            boxes[i, y0:y1, x0:x1] = True
        return boxes.to(pred.device), source.to(pred.device)

    # ------------------------------------------------------------------------------------------- losses
    def consistency_loss(self, pred: Tensor, teacher_logits: Tensor, valid: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None) -> Tensor:
        """``Σ W r m ℓ / Σ r`` (step 5) of student logits against the teacher's pseudo-labels."""
        cfg = self.config.ael
        conf, target = teacher_logits.softmax(dim=1).max(dim=1)
        rates = equalization_rates(self.confidence, cfg.sample_gamma).to(pred.device)
        sample = self.rand(*target.shape, device=pred.device) > 1.0 - rates[pred.detach().argmax(dim=1)]
        reweight = conf.pow(cfg.gamma) * sample
        keep = conf >= cfg.threshold
        if valid is not None:
            keep = keep & valid
        return self.weighting.loss(pred, target, weight, reweight * keep, reweight)

    # --------------------------------------------------------------------------------------------- step
    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        cfg = self.config.ael
        x, y = self.copy_paste(labelled["image"], labelled["mask"])
        u, ignore = unlabelled["weak"], unlabelled["ignore"]

        with torch.no_grad():
            out_tl = self.teacher(x)
            out_tu = self.teacher(u)
            conf_u, pseudo_u = out_tu.logits.softmax(dim=1).max(dim=1)
            self.weighting.update(out_tl.features, out_tl.logits, y, out_tu.features, conf_u, pseudo_u, ignore,
                                  unlabelled.get("box_mask"))
            w = self.weighting.weights(out_tu.features, pseudo_u, conf_u)
            if cfg.cutmix:
                box, source = self.cutmix_boxes(pseudo_u)
            else:
                box, source = torch.zeros_like(ignore, dtype=torch.bool), partner_index(u.shape[0], u.device)

            def mix(t: Tensor) -> Tensor:
                return paste(t, t[source], box)

            u_mix, logits_tu, ignore_mix = mix(u), mix(out_tu.logits), mix(ignore)
            w_mix = None if w is None else mix(w)

        out_l = self.model(x)
        pred_l = out_l.logits
        pred_u = self.model(u_mix).logits
        loss_x = labelled_loss(pred_l, out_l.aux, y, self.config)
        with torch.no_grad():
            batch_conf = category_confidence(pred_l, y, self.num_classes)
            self.confidence = cfg.momentum * self.confidence + (1.0 - cfg.momentum) * batch_conf

        loss_cl = self.consistency_loss(pred_l, out_tl.logits)
        loss_cu = self.consistency_loss(pred_u, logits_tu, ignore_mix != 255, w_mix)
        loss = loss_x + cfg.unsup_weight * (loss_cl + loss_cu)

        valid = ignore_mix != 255
        confident = (logits_tu.softmax(dim=1).amax(dim=1) >= cfg.threshold) & valid
        terms = {"loss_x": loss_x.detach(), "loss_cons_l": loss_cl.detach(), "loss_cons_u": loss_cu.detach(),
                 "mask_ratio": confident.sum() / valid.sum().clamp_min(1),
                 "confidence_min": self.confidence.min().detach()}
        if w_mix is not None:
            terms["weight_mean"] = (w_mix * confident).sum() / confident.sum().clamp_min(1)
        return StepOutput(loss, terms)
