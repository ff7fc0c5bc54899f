"""UniMatch (Yang et al., CVPR 2023): one network, a weak view, two strong views and a feature-perturbed view.

Recipe (frameworks.md)::

    pred_x, pred_w, pred_w_fp = model(cat(x, u_w), feature_perturbation=True)
    conf_w, mask_w = softmax(pred_w.detach()).max(1)
    pred_s1, pred_s2 = model(cat(u_s1, u_s2))          # strong views, CutMixed inside their boxes
    loss = (CE(pred_x, y) + 0.25 L(s1) + 0.25 L(s2) + 0.5 L(fp)) / 2

Each unsupervised term is ``Σ m_i ℓ_i / Σ [i not ignored]`` with ``m_i = [conf_i ≥ τ] [i not ignored]``: UniMatch's
own normaliser counts every non-ignored pixel, confident or not, and hafis keeps it. With the weighting on, every
pixel term is multiplied by ``W`` computed on the weak view's features; inside a CutMix box the pseudo-label,
confidence, ignore mask *and* ``W`` come from the mixed-in image, exactly like its pixels.

The mixed-in image of image ``i`` is image ``i + 1`` of the same unlabelled batch (cyclically). The released code
draws a second unlabelled batch for mixing and runs an extra forward pass on it; mixing inside the batch is the
same operation on a different pairing and saves that pass, which matters on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Framework, StepOutput
from .losses import supervised_loss


def cutmix(inside: Tensor, base: Tensor, box: Tensor, partner: Tensor) -> Tensor:
    """``base`` with the pixels of ``box`` (``(B, H, W)`` bool) taken from ``inside[partner]``; works for images too."""
    if base.dim() == 4:
        box = box[:, None]
    return torch.where(box, inside[partner], base)


def partner_index(batch_size: int, device: torch.device) -> Tensor:
    """Image ``i`` mixes in image ``i + 1`` (mod B)."""
    return torch.roll(torch.arange(batch_size, device=device), -1)


class UniMatch(Framework):
    name = "unimatch"

    def train_step(self, labelled: dict, unlabelled: Optional[dict], iteration: int) -> StepOutput:
        cfg = self.config.unimatch
        x, y = labelled["image"], labelled["mask"]
        u_w, ignore = unlabelled["weak"], unlabelled["ignore"]
        box1, box2 = unlabelled["box1"], unlabelled["box2"]
        n_l, n_u = x.shape[0], u_w.shape[0]
        partner = partner_index(n_u, u_w.device)
        u_s1 = cutmix(unlabelled["strong1"], unlabelled["strong1"], box1, partner)
        u_s2 = cutmix(unlabelled["strong2"], unlabelled["strong2"], box2, partner)

        out = self.model(torch.cat([x, u_w]), feature_perturbation=True)
        pred_x, pred_w = out.logits.split([n_l, n_u])
        pred_w_fp = out.logits_fp[n_l:]
        feat_l, feat_w = out.features.detach().split([n_l, n_u])
        pred_s1, pred_s2 = self.model(torch.cat([u_s1, u_s2])).logits.chunk(2)

        with torch.no_grad():
            conf_w, mask_w = pred_w.detach().softmax(dim=1).max(dim=1)
            # the bank reads the weak view (not CutMixed), so its box mask is the weak view's own
            self.weighting.update(feat_l, pred_x.detach(), y, feat_w, conf_w, mask_w, ignore,
                                  unlabelled.get("box_mask"))
            w = self.weighting.weights(feat_w, mask_w)

        loss_x = supervised_loss(pred_x, y, self.config.loss)
        terms = {"loss_x": loss_x.detach()}
        unsup = []
        views = (("s1", pred_s1, box1), ("s2", pred_s2, box2), ("fp", pred_w_fp, None))
        for name, pred, box in views:
            if box is None:
                target, conf, ign, weight = mask_w, conf_w, ignore, w
            else:
                target, conf, ign = (cutmix(t, t, box, partner) for t in (mask_w, conf_w, ignore))
                weight = None if w is None else cutmix(w, w, box, partner)
            valid = ign != 255
            loss = self.weighting.loss(pred, target, weight, (conf >= cfg.threshold) & valid, valid)
            terms[f"loss_{name}"] = loss.detach()
            unsup.append(loss)
        loss_s1, loss_s2, loss_fp = unsup
        loss = (loss_x + cfg.strong_weight * (loss_s1 + loss_s2) + cfg.fp_weight * loss_fp) / 2.0

        valid = ignore != 255
        confident = (conf_w >= cfg.threshold) & valid
        terms["mask_ratio"] = confident.sum() / valid.sum().clamp_min(1)
        if w is not None:
            terms["weight_mean"] = (w * confident).sum() / confident.sum().clamp_min(1)
        return StepOutput(loss, terms)
