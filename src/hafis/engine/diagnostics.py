"""How good are the pseudo-labels, and does ``W`` single out the wrong ones? Measured against unlabelled ground truth.

Only for reports: training never reads the unlabelled ground truth. The numbers answer the questions behind the
method: what share of pseudo-label pixels is wrong, how clean are the pixels judged reliable, does ``W`` rank right
pseudo-labels above wrong ones better than the confidence does (AUROC), and how much of the loss's mass falls on
wrong pixels once weighted. The trainer logs them at every evaluation with ``eval.diagnostics_images > 0``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from hafis.data.base import DataError, SegmentationSource
from hafis.data.transforms import normalize, to_tensor_image
from hafis.weighting import confident_pixels, detector_reliable

from .metrics import auroc


def load_images(source: SegmentationSource, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole images (normalised) and their masks (255 where missing), stacked; images must share one size."""
    samples = [source.load(i) for i in indices]
    sizes = sorted({s.image.shape[:2] for s in samples})
    if len(sizes) > 1:
        raise DataError(f"the unlabelled images probed for pseudo-label quality differ in size ({sizes[0]} vs "
                        f"{sizes[-1]}); set eval.diagnostics_images to 0 or use equally sized images")
    images = torch.stack([normalize(to_tensor_image(s.image)) for s in samples])
    masks = torch.stack([torch.from_numpy(s.mask).long() if s.mask is not None
                         else torch.full(s.image.shape[:2], 255, dtype=torch.long) for s in samples])
    return images, masks


@torch.no_grad()
def pseudo_label_quality(framework, images: torch.Tensor, gt: torch.Tensor, batch_size: int = 16,
                         box_masks: Optional[torch.Tensor] = None) -> dict:
    """Pseudo-label quality of ``images`` against ``gt``: a flat dict of floats (NaN where undefined).

    - ``pseudo_error`` / ``confident_error`` / ``reliable_error``: wrong share over all non-ignored pixels / the
      confident ones (>= ``tau_seg``) / the ones the configured rule lets into the bank; ``*_share``: their share;
    - with ``W``: ``pseudo_error_weighted`` / ``confident_error_weighted`` = Σ W·wrong / Σ W (what the weighted loss
      sees), mean W on right and wrong pixels (pooled and within a class), ``auroc_weight`` (``_within_class``),
      ``weight_class_{c}``: the mean W of the pixels pseudo-labelled ``c``;
    - ``auroc_confidence`` (``_within_class``): the confidence as a predictor of a right pseudo-label; within a class =
      the mean over classes with right and wrong pixels, since classes differ in both (the class mix alone moves the
      pooled numbers);
    - ``bank_{confidence,detector}_{share,precision}``: the pixels that would feed the bank by confidence alone, and
      by the detector rule when ``box_masks`` (``(N, C, H, W)`` detection box masks of the images) are given.
    """
    device = next(framework.model.parameters()).device
    w_config = framework.config.weighting
    things = tuple(getattr(framework.weighting, "thing_classes", ()))
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        box = None if box_masks is None else box_masks[start:start + batch_size].to(device)
        out = framework.pseudo_labels(images[start:start + batch_size].to(device), box)
        target = gt[start:start + batch_size].to(device)
        valid = target != 255
        pixel = {"wrong": out["pseudo"] != target, "cls": out["pseudo"], "confidence": out["confidence"],
                 "reliable": out["reliable"],
                 "by_confidence": confident_pixels(out["confidence"], out["pseudo"], w_config.tau_seg)}
        if out.get("weight") is not None:
            pixel["weight"] = out["weight"]
        if box is not None:
            pixel["by_detector"] = detector_reliable(out["confidence"], out["pseudo"], valid, box, things,
                                                     w_config.tau_seg, w_config.stuff)
        for key, value in pixel.items():  # non-ignored pixels only, flattened
            parts.setdefault(key, []).append(value[valid].cpu())
    px = {k: torch.cat(v) for k, v in parts.items()}
    wrong = px["wrong"].double()
    right = 1.0 - wrong
    confident = (px["confidence"] >= w_config.tau_seg).double()
    n = wrong.numel()
    cls = px["cls"].clamp(0, framework.num_classes - 1).long()

    def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
        return float(num.sum() / den.sum()) if float(den.sum()) > 0 else float("nan")

    def within_class(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per pseudo-label class mean of ``values`` over ``mask`` (NaN where the class has none)."""
        total = torch.bincount(cls, weights=values * mask, minlength=framework.num_classes)
        count = torch.bincount(cls, weights=mask, minlength=framework.num_classes)
        return total / count

    stats = {
        "pseudo_error": ratio(wrong, torch.ones_like(wrong)),
        "confident_share": float(confident.mean()) if n else float("nan"),
        "confident_error": ratio(wrong * confident, confident),
        "reliable_share": float(px["reliable"].double().mean()) if n else float("nan"),
        "reliable_error": ratio(wrong * px["reliable"], px["reliable"].double()),
        "auroc_confidence": float(auroc(px["confidence"], ~px["wrong"])),
        "auroc_confidence_within_class": _nanmean(auroc(px["confidence"], ~px["wrong"], cls, framework.num_classes)),
    }
    for rule in ("confidence", "detector"):
        if f"by_{rule}" in px:
            chosen = px[f"by_{rule}"].double()
            stats[f"bank_{rule}_share"] = float(chosen.mean()) if n else float("nan")
            stats[f"bank_{rule}_precision"] = ratio(right * chosen, chosen)
    if "weight" in px and framework.weighting.enabled:
        w = px["weight"].double()
        stats["pseudo_error_weighted"] = ratio(w * wrong, w)
        stats["confident_error_weighted"] = ratio(w * wrong * confident, w * confident)
        stats["weight_right"] = ratio(w * right, right)
        stats["weight_wrong"] = ratio(w * wrong, wrong)
        counts = torch.bincount(cls, weights=wrong, minlength=framework.num_classes), \
            torch.bincount(cls, weights=right, minlength=framework.num_classes)
        both = (counts[0] > 0) & (counts[1] > 0)  # classes with right and wrong pseudo-labels
        if bool(both.any()):
            stats["weight_right_within_class"] = float(within_class(w, right)[both].mean())
            stats["weight_wrong_within_class"] = float(within_class(w, wrong)[both].mean())
        by_class = within_class(w, torch.ones_like(w))
        stats.update({f"weight_class_{c}": float(by_class[c]) for c in range(framework.num_classes)})
        stats["auroc_weight"] = float(auroc(w, ~px["wrong"]))
        stats["auroc_weight_within_class"] = _nanmean(auroc(w, ~px["wrong"], cls, framework.num_classes))
    return stats


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else float("nan")
