"""UniMatch V2 (Yang et al., 2025): an EMA teacher, two CutMixed strong views and complementary dropout.

Recipe per iteration ``t`` (the release's ``unimatch_v2.py``; its segmenter is ``model.name: dpt``)::

    teacher (EMA, eval mode, no grad) on u_w:   conf_w, mask_w = softmax(logits).max(1)
    u_s1, u_s2: each strong view with its CutMix box pasted from the same batch reversed (image i takes image
                B-1-i); mask_w, conf_w and the ignore mask follow the boxes the same way
    pred_x = student(x)
    pred_s1, pred_s2 = student(cat(u_s1, u_s2), feature_mask=M)          # complementary dropout
    L_s = Σ ℓ [conf ≥ τ][not ignored] / Σ [not ignored]                  # per strong view, UniMatch's normaliser
    loss = (L_x + (L_s1 + L_s2) / 2) / 2
    after the optimiser step: θ_t ← r θ_t + (1 − r) θ_s, r = min(1 − 1/(t + 1), 0.996), parameters and buffers

**Complementary dropout** ``M`` (``(2B, D)``, one factor per encoder channel, the same on every token and on the
four encoder levels): image ``i`` of the first strong view gets ``m_i ∈ {0, 2}^D`` (Bernoulli(0.5) × 2), its
partner ``B + i`` (the same image's second view) gets ``2 − m_i``, so the two views see complementary channels; a
random ``⌊B/2⌋`` of the pairs keep every channel (factor 1). The draws come from the framework's generator
(checkpointed), not the global RNG, so the weighting on or off changes no draw and a resumed run replays them.

Training uses AdamW (β 0.9 / 0.999, weight decay 0.01), encoder lr 5e-6 and decoder ×40 (``optim.*`` in the paper
configs), the poly schedule set after each step as released (``lr_lag = 1``: step ``t`` uses ``lr(t − 1)``). The
CutMix boxes are the unlabelled stream's (``unimatch.cutmix_prob``, 0.5 as released). Both networks are evaluated:
the teacher is the run's model (evaluated and checkpointed as ``model``) once it has an EMA update, and the
student is evaluated beside it (``miou_student`` in the log; ``best_network`` says which scored higher).

**With the weighting** ``W`` is computed from the features of the network that made the pseudo-labels, the
teacher's weak-view pass, like hafis's other mean-teacher frameworks; inside a CutMix box ``W`` comes from the
reversed partner like the pseudo-label. The bank takes labelled pixels from the student's labelled pass and
unlabelled pixels from the teacher's weak view.

Departures from the release: one process's batch is CutMixed with its own reverse (as released per GPU); the
student's buffers (none in the dpt segmenter) are averaged like its parameters, integer buffers copied.

**Data, as released**: UniMatch's pipeline (its ``dataset/semi.py`` makes the same ``resize``, ``crop``, ``hflip``,
``blur`` and ``obtain_cutmix_box`` calls with the same arguments), so the same geometry and strong views, checked
pixel for pixel at its crops 518 (500 × 375 images) and 798 (2048 × 1024), with UniMatch's measured departure (the
weak image within 2 grey levels of PIL's ``BILINEAR``; see :mod:`hafis.frameworks.unimatch`). Its unlabelled mask
is all zeros rather than read from disk, so the ignore region is the padding, as in hafis.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from .base import FrameworkContext, LabelledBatch, StepOutput, UnlabelledBatch
from .losses import supervised_loss
from .mixing import paste
from .teacher import MeanTeacherFramework
from .unimatch import confidence_terms


def complementary_dropout_mask(pairs: int, channels: int, generator: torch.Generator,
                               keep_share: float = 0.5) -> Tensor:
    """``(2 * pairs, channels)`` factors: ``m`` in {0, 2} for row ``i``, ``2 − m`` for row ``pairs + i``, and
    ``int(pairs * keep_share)`` random pairs all ones."""
    m = torch.bernoulli(torch.full((pairs, channels), 0.5), generator=generator) * 2.0
    first, second = m.clone(), 2.0 - m
    kept = torch.randperm(pairs, generator=generator)[:int(pairs * keep_share)]
    first[kept] = 1.0
    second[kept] = 1.0
    return torch.cat([first, second])


def reverse_paste(base: Tensor, box: Tensor) -> Tensor:
    """``base`` with the pixels of ``box`` taken from the batch reversed (image ``i`` from image ``B − 1 − i``)."""
    return paste(base, base.flip(0), box)


class UniMatchV2(MeanTeacherFramework):
    name = "unimatch_v2"
    traits = replace(MeanTeacherFramework.traits, lr_lag=1)

    def __init__(self, config, model: nn.Module, ctx: FrameworkContext) -> None:
        super().__init__(config, model, ctx)
        self.traits = replace(self.traits, cutmix_prob=config.unimatch.cutmix_prob)  # the stream's box1 / box2
        #: encoder channels the complementary dropout masks
        self.channels = model.backbone.embed_dim if hasattr(model, "backbone") and \
            hasattr(model.backbone, "embed_dim") else None
        if config.unimatch_v2.complementary_dropout and self.channels is None:
            raise ValueError("unimatch_v2.complementary_dropout needs the dpt segmenter (model.name=dpt); set "
                             "unimatch_v2.complementary_dropout=false for another one")

    def eval_models(self) -> dict[str, nn.Module]:
        """Both networks are evaluated, as released (the teacher is :meth:`eval_model`)."""
        return {"teacher": self.teacher.module, "student": self.model} if self.ema_updates > 0 else {}

    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        cfg = self.config.unimatch_v2
        x, y = labelled["image"], labelled["mask"]
        u_w, ignore = unlabelled["weak"], unlabelled["ignore"]
        box1, box2 = unlabelled["box1"], unlabelled["box2"]
        n_u = u_w.shape[0]
        with torch.no_grad():
            teacher = self.teacher(u_w)
            conf_w, mask_w = teacher.logits.detach().softmax(dim=1).max(dim=1)
            feat_w = teacher.features.detach()
        u_s1 = reverse_paste(unlabelled["strong1"], box1)
        u_s2 = reverse_paste(unlabelled["strong2"], box2)

        out_x = self.model(x)
        pred_x = out_x.logits
        mask = None
        if cfg.complementary_dropout:
            mask = complementary_dropout_mask(n_u, self.channels, self.generator).to(u_w.device)
        pred_s1, pred_s2 = self.model(torch.cat([u_s1, u_s2]), feature_mask=mask).logits.chunk(2)

        with torch.no_grad():
            mixed = [{k: reverse_paste(v, box) for k, v in (("mask", mask_w), ("conf", conf_w), ("ignore", ignore))}
                     for box in (box1, box2)]
            self.weighting.update(out_x.features.detach(), pred_x.detach(), y, feat_w, conf_w, mask_w, ignore,
                                  unlabelled.get("box_mask"))
            w = self.weighting.weights(feat_w, mask_w, conf_w)

        loss_x = supervised_loss(pred_x, y, self.config.loss)
        terms = {"loss_x": loss_x.detach()}
        unsup = []
        for name, pred, t, box in (("s1", pred_s1, mixed[0], box1), ("s2", pred_s2, mixed[1], box2)):
            valid = t["ignore"] != 255
            weight = None if w is None else reverse_paste(w, box)
            loss = self.weighting.loss(pred, t["mask"], weight, (t["conf"] >= cfg.threshold) & valid, valid)
            terms[f"loss_{name}"] = loss.detach()
            unsup.append(loss)
        loss_s = (unsup[0] + unsup[1]) / 2.0
        loss = (loss_x + loss_s) / 2.0
        return StepOutput(loss, {**terms, **confidence_terms(conf_w, ignore, cfg.threshold, w)})

    def after_optimizer_step(self, iteration: int) -> None:
        self.update_teacher(self.teacher.warmup_decay(iteration, self.config.unimatch_v2.ema_decay))
