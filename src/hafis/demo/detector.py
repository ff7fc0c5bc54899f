"""The demo's detector-verified run: the detector step before it and its picture.

The detector is the config's ``detector`` section (the demo configs: a tiny CPU Faster R-CNN trained for a few
hundred steps on the labelled images); its detections over the unlabelled images are cached under the demo's output
folder, so a second demo run reuses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from hafis.config import Config
from hafis.data import build_sources
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hafis.detection.cache import box_quality
from hafis.detection.step import run_detect
from hafis.engine.diagnostics import load_images
from hafis.engine.visualize import binary_bar, class_legend, class_palette, colourise
from hafis.extras import require
from hafis.files import atomic_write
from hafis.weighting import confident_pixels

#: the fourth run of the demo: UniMatch + W whose prototypes take only detector-verified unlabelled pixels
DETECTOR_RUN = ("unimatch + W, detector-verified prototypes",
                ["train.framework=unimatch", "weighting.enabled=true", "weighting.reliable=detector"])
#: unlabelled images whose detections are checked against the ground-truth boxes
NUM_BOX_CHECK = 200


@dataclass
class DetectorInfo:
    seconds: float
    summary: dict
    tau_det: float
    arch: str
    iterations: int
    #: box precision / recall of detections >= tau_det against ground-truth boxes (IoU >= 0.5, same class)
    boxes: dict = field(default_factory=dict)


def prepare_detector(config: Config, log: Callable[[str], None] = print) -> DetectorInfo:
    """``hafis detect`` for the demo's config (reuses a matching detector and cache from an earlier demo)."""
    t0 = time.perf_counter()
    detections, _ = run_detect(config, log=lambda m: log(f"[demo]   {m}"), progress=config.train.progress_bar)
    seconds = time.perf_counter() - t0
    d = config.detector
    info = DetectorInfo(seconds, detections.summary(config.weighting.tau_det), config.weighting.tau_det, d.arch,
                        d.iterations)
    unlabelled = build_sources(config.data)[1]
    info.boxes = box_quality(detections, unlabelled, range(min(NUM_BOX_CHECK, len(unlabelled))), info.tau_det)
    return info


def _draw_boxes(ax, boxes, labels, scores, tau: float, palette: np.ndarray, faint: float = 0.5) -> None:
    patches = require("matplotlib.patches", "viz", "the demo's pictures")
    for (x0, y0, x1, y1), c, s in zip(boxes, labels, scores, strict=True):
        if s < faint:
            continue
        strong = s >= tau
        ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=palette[int(c)], linewidth=1.4 if strong else 0.7,
                                       linestyle="-" if strong else "--"))
        if strong:
            ax.text(x0, y0, f"{s:.2f}", color="white", fontsize=5, va="bottom",
                    bbox={"facecolor": palette[int(c)], "pad": 0.5, "linewidth": 0})


@torch.no_grad()
def plot_detections(trainer, path: Path, count: int = 4) -> Optional[Path]:
    """Detections over pseudo-labels: image + detections (solid: score >= tau_det, dashed: 0.5 to tau_det),
    pseudo-label + the boxes that count, reliable pixels by confidence alone and by confidence + detector, and the
    hidden ground truth, for a few unlabelled images (the first ones with a detection >= tau_det, so the picture
    shows the rule at work; images without one have no detector-reliable pixel at all)."""
    if getattr(trainer, "box_masks", None) is None:
        return None
    provider, w = trainer.box_masks, trainer.config.weighting
    det = provider.detections
    with_boxes = [i for i in range(len(det)) if bool((det.get(i)[2] >= w.tau_det).any())][:count]
    indices = (with_boxes + [i for i in range(len(det)) if i not in with_boxes])[:count]
    count = len(indices)
    images, gt = load_images(trainer.unlabelled_source, indices)
    box_mask = provider.batch(indices).to(trainer.device)
    out = trainer.framework.pseudo_labels(images.to(trainer.device), box_mask)
    confident = confident_pixels(out["confidence"], out["pseudo"], w.tau_seg).cpu().numpy()
    dataset = trainer.config.data.dataset
    palette = class_palette(dataset)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cols = ["image + detections", f"pseudo-label + boxes >= {w.tau_det:g}", f"reliable: confidence >= {w.tau_seg:g}",
            "reliable: confidence + detector", "ground truth (hidden)"]
    fig = require("matplotlib.figure", "viz", "the demo's pictures").Figure(
        figsize=(2.3 * len(cols) + 1.6, 2.3 * count + 1.0), layout="constrained")
    axes = fig.subplots(count, len(cols), squeeze=False)
    binary = None
    for i in range(count):
        boxes, labels, scores = det.get(indices[i])
        image = (images[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        panels = [image, colourise(out["pseudo"][i].cpu().numpy(), dataset), confident[i].astype(float),
                  out["reliable"][i].cpu().numpy().astype(float), colourise(gt[i].numpy(), dataset)]
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            drawn = ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1,
                              interpolation="nearest")
            binary = drawn if panel.ndim == 2 else binary
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
        _draw_boxes(axes[i, 0], boxes, labels, scores, w.tau_det, palette)
        axes[i, 0].set_ylabel(str(det.ids[indices[i]]), fontsize=6)
        keep = scores >= w.tau_det
        _draw_boxes(axes[i, 1], boxes[keep], labels[keep], scores[keep], w.tau_det, palette)
    binary_bar(fig, binary, axes[:, 2:4], ("not reliable", "reliable"), shrink=0.6)
    class_legend(fig, trainer.class_names, [out["pseudo"].cpu().numpy(), gt.numpy()], dataset)
    lines = require("matplotlib.lines", "viz", "the demo's pictures")
    styles = [lines.Line2D([], [], color="0.3", linewidth=1.4, label=f"score >= {w.tau_det:g} (counts)")]
    if w.tau_det > 0.5:  # the dashed boxes: 0.5 <= score < tau_det
        styles.append(lines.Line2D([], [], color="0.3", linewidth=0.7, linestyle="--",
                                   label=f"score 0.5 to {w.tau_det:g}"))
    fig.legend(handles=styles, loc="outside right lower", fontsize=7, title="detections (label: score)",
               title_fontsize=7, frameon=False)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    return Path(path)
