"""UniMatch (Yang et al., CVPR 2023): one network, a weak view, two strong views and a feature-perturbed view.

Recipe (the released ``unimatch.py``)::

    pred_x, pred_w, pred_w_fp = model(cat(x, u_w), feature_perturbation=True)
    conf_w, mask_w = softmax(pred_w.detach()).max(1)
    pred_s1, pred_s2 = model(cat(u_s1, u_s2))          # strong views, CutMixed inside their boxes
    loss = (CE(pred_x, y) + 0.25 L(s1) + 0.25 L(s2) + 0.5 L(fp)) / 2

Each unsupervised term is ``Σ m_i ℓ_i / Σ [i not ignored]`` with ``m_i = [conf_i ≥ τ] [i not ignored]``: UniMatch's
own normaliser counts every non-ignored pixel, confident or not, and hafis keeps it. With the weighting on, every
pixel term is multiplied by ``W`` computed on the weak view's features; inside a CutMix box the pseudo-label,
confidence, ignore mask *and* ``W`` come from the mixed-in image, exactly like its pixels.

The mixed-in images (``unimatch.mix``) come, under ``same_images`` and ``other_images``, from a second unlabelled
batch (the trainer's ``unlabelled["mix"]``), whose pseudo-labels, confidences and ``W`` come from an extra
``no_grad`` forward in **eval mode** (BatchNorm running statistics), run before the training passes so it sees the
statistics as they were at the start of the step. ``same_images`` (default) is the release: it iterates its
unlabelled loader twice in step, both passes shuffled by the same sampler seed, so the second batch holds the same
images, augmented independently (another crop, colours and flip), and each image's boxes take the pixels of another
view of itself (unintended upstream, LiheYoung/UniMatch#51 and #85; the maintainer reports the same accuracy).
``other_images`` mixes in other images, as the method describes: a second batch in an order of its own.
``in_batch`` (cheaper: no second batch, no extra pass) mixes image ``i + 1`` of the same batch (cyclically) with its
train-mode pseudo-labels; with one unlabelled image per process it mixes each image with itself, i.e. CutMix does
nothing.

The learning rate is set after each step, as released: step ``t`` uses the poly rate of iteration ``t - 1`` (step 0
the base rate).

The bank (``weighting.bank_view``) is fed from the weak view (hafis) or from the two strong views with their
CutMixed pseudo-labels, confidences, ignore masks and box masks (the authors' code).

**Data, as released** (``dataset/transform.py``, ``dataset/semi.py``; tests/data/test_released_pipelines.py, at
crop 321 on 500 × 375 and 801 on 2048 × 1024 images): the long side uniform in the integers ``int(L/2) .. 2L``,
padding bottom / right (image 0, mask 255, the unlabelled mask's 254 as the ignore region), crop, flip; the strong
views with the released PIL operations; the CutMix boxes. Given the same draws, masks, ignore regions, box masks,
boxes and strong views (of the same weak image) equal the release's exactly. Departures, measured: the weak image is
torch's antialiased bilinear, not PIL's ``BILINEAR``: at most 2 grey levels apart, on 0.3 % of the pixels on
average over the scale draws (7.9 % at worst); the draws come from one generator per sample in hafis's order (the
crop's row before its column, the jitter's factors before their order), not from ``random`` / ``numpy`` /
``torch``: the same distributions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .base import Framework, FrameworkContext, LabelledBatch, StepOutput, Traits, UnlabelledBatch
from .losses import supervised_loss
from .mixing import partner_index, paste

#: ``unimatch.mix``: where CutMix takes its pixels (see the module docstring)
MIXES = ("same_images", "other_images", "in_batch")


def confidence_terms(conf: Tensor, ignore: Tensor, threshold: float, w: Optional[Tensor]) -> dict[str, Tensor]:
    """The logged share of confident non-ignored pixels and, with the weighting on, the mean ``W`` over them."""
    valid = ignore != 255
    confident = (conf >= threshold) & valid
    terms = {"mask_ratio": confident.sum() / valid.sum().clamp_min(1)}
    if w is not None:
        terms["weight_mean"] = (w * confident).sum() / confident.sum().clamp_min(1)
    return terms


class UniMatch(Framework):
    name = "unimatch"
    traits = Traits(lr_lag=1, strong_bank_view=True)

    def __init__(self, config, model, ctx: FrameworkContext) -> None:
        super().__init__(config, model, ctx)
        self.traits = replace(self.traits, cutmix_prob=config.unimatch.cutmix_prob,
                              mix_batch=None if config.unimatch.mix == "in_batch" else config.unimatch.mix)

    @torch.no_grad()
    def _second_batch(self, unlabelled: UnlabelledBatch) -> dict:
        """What the CutMix boxes take from a second batch: its strong views, and pseudo-labels,
        confidences and features of an eval-mode pass over its weak view."""
        mix = unlabelled.get("mix")
        if mix is None:
            raise ValueError(f"unimatch.mix is {self.traits.mix_batch!r} but the unlabelled batch has no 'mix' batch: "
                             "the trainer supplies it; in a loop of your own pass one, or set unimatch.mix=in_batch")
        was_training = self.model.training
        self.model.eval()
        out = self.model(mix["weak"])
        self.model.train(was_training)
        conf, mask = out.logits.detach().softmax(dim=1).max(dim=1)
        return {"mask": mask, "conf": conf, "ignore": mix["ignore"], "features": out.features.detach(),
                **{k: mix[k] for k in ("strong1", "strong2", "box_mask") if k in mix}}

    @staticmethod
    def _in_batch(unlabelled: UnlabelledBatch, weak: dict) -> dict:
        """What the CutMix boxes take under ``in_batch``: image ``i + 1`` of this batch, with its train-mode
        predictions (``weak``)."""
        partner = partner_index(unlabelled["weak"].shape[0], unlabelled["weak"].device)
        src = {**weak, **{k: unlabelled[k] for k in ("strong1", "strong2", "box_mask") if k in unlabelled}}
        return {k: v[partner] for k, v in src.items()}

    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        cfg = self.config.unimatch
        x, y = labelled["image"], labelled["mask"]
        u_w, ignore = unlabelled["weak"], unlabelled["ignore"]
        box1, box2 = unlabelled["box1"], unlabelled["box2"]
        n_l, n_u = x.shape[0], u_w.shape[0]
        # the second batch's eval-mode pass comes first, as released: its BatchNorm statistics are the step's start
        mix = self._second_batch(unlabelled) if self.traits.mix_batch else None

        out = self.model(torch.cat([x, u_w]), feature_perturbation=True)
        pred_x, pred_w = out.logits.split([n_l, n_u])
        pred_w_fp = out.logits_fp[n_l:]
        feat_l, feat_w = out.features.detach().split([n_l, n_u])
        with torch.no_grad():
            conf_w, mask_w = pred_w.detach().softmax(dim=1).max(dim=1)
            if mix is None:
                mix = self._in_batch(unlabelled, {"mask": mask_w, "conf": conf_w, "ignore": ignore,
                                                  "features": feat_w})
        u_s1 = paste(unlabelled["strong1"], mix["strong1"], box1)
        u_s2 = paste(unlabelled["strong2"], mix["strong2"], box2)
        out_s = self.model(torch.cat([u_s1, u_s2]))
        pred_s1, pred_s2 = out_s.logits.chunk(2)

        with torch.no_grad():
            # pseudo-label, confidence, ignore mask (and box mask, W) follow the boxes like the pixels
            mixed = [{k: paste(base, mix[k], box) for k, base in (("mask", mask_w), ("conf", conf_w),
                                                                   ("ignore", ignore))} for box in (box1, box2)]
            box_mask = unlabelled.get("box_mask")
            if self.config.weighting.bank_view == "strong":
                bank_box = None if box_mask is None else \
                    torch.cat([torch.where(b[:, None, :, :], mix["box_mask"], box_mask) for b in (box1, box2)])
                self.weighting.update(feat_l, pred_x.detach(), y, out_s.features.detach(),
                                      torch.cat([m["conf"] for m in mixed]), torch.cat([m["mask"] for m in mixed]),
                                      torch.cat([m["ignore"] for m in mixed]), bank_box)
            else:
                self.weighting.update(feat_l, pred_x.detach(), y, feat_w, conf_w, mask_w, ignore, box_mask)
            w = self.weighting.weights(feat_w, mask_w, conf_w)
            w_mix = None
            if w is not None:
                # W inside a box: of the mixed-in image's weak-view features and pseudo-labels
                if self.traits.mix_batch:
                    w_mix = self.weighting.weights(mix["features"], mix["mask"], mix["conf"])
                else:
                    w_mix = w[partner_index(n_u, w.device)]

        loss_x = supervised_loss(pred_x, y, self.config.loss)
        terms = {"loss_x": loss_x.detach()}
        unsup = []
        views = (("s1", pred_s1, mixed[0], box1), ("s2", pred_s2, mixed[1], box2),
                 ("fp", pred_w_fp, {"mask": mask_w, "conf": conf_w, "ignore": ignore}, None))
        for name, pred, t, box in views:
            weight = w if box is None or w is None else paste(w, w_mix, box)
            valid = t["ignore"] != 255
            loss = self.weighting.loss(pred, t["mask"], weight, (t["conf"] >= cfg.threshold) & valid, valid)
            terms[f"loss_{name}"] = loss.detach()
            unsup.append(loss)
        loss_s1, loss_s2, loss_fp = unsup
        # summed in the released order (floating-point addition is not associative)
        loss = (loss_x + loss_s1 * cfg.strong_weight + loss_s2 * cfg.strong_weight + loss_fp * cfg.fp_weight) / 2.0

        return StepOutput(loss, {**terms, **confidence_terms(conf_w, ignore, cfg.threshold, w)})
