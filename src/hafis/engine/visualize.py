"""Pictures of what the method sees: image, ground truth, pseudo-label, confidence, reliable mask and weight map.

Used by ``hafis visualize CONFIG --checkpoint PATH --out DIR`` and by the demo report. The model, the prototype
bank and (with ``weighting.reliable: detector``) the cached detections come from the checkpoint and the config,
so the pictures show exactly the state training was in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from hafis.data.base import DataError, SegmentationSource, load_checked
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_tensor_image
from hafis.extras import require
from hafis.files import atomic_write


def class_palette(dataset: str = "") -> np.ndarray:
    """``(256, 3)`` RGB in [0, 1] per class id: the colours of ``hafis predict``'s mask PNGs
    (:func:`hafis.engine.inference.palette`), so every picture and mask of a dataset shows a class in one colour."""
    from hafis.engine.inference import palette

    return np.asarray(palette(dataset), np.float64).reshape(-1, 3)[:256] / 255


def colourise(mask: np.ndarray, dataset: str = "") -> np.ndarray:
    """Class ids -> RGB in [0, 1] (:func:`class_palette`); ignore (255) is white."""
    rgb = class_palette(dataset)[mask.astype(np.int64).clip(0, 255)]
    rgb[mask == 255] = 1.0
    return rgb


#: a legend lists every class up to this many; beyond, only the classes shown
MAX_LEGEND_CLASSES = 24


def class_legend(fig, class_names: Sequence[str], masks: Sequence[np.ndarray], dataset: str = "",
                 loc: str = "outside right upper") -> None:
    """A legend of the class colours with the dataset's names (every class, or with more than
    :data:`MAX_LEGEND_CLASSES` the ones in ``masks``), and ``ignore`` where a mask has it."""
    patches = require("matplotlib.patches", "viz", "drawing pictures")
    shown = np.unique(np.concatenate([np.unique(m) for m in masks])) if masks else np.arange(0)
    ids = range(len(class_names)) if len(class_names) <= MAX_LEGEND_CLASSES else [
        int(c) for c in shown if c < len(class_names)]
    colours = class_palette(dataset)
    handles = [patches.Patch(facecolor=colours[c], edgecolor="0.5", linewidth=0.5, label=f"{c} {class_names[c]}")
               for c in ids]
    if 255 in shown:
        handles.append(patches.Patch(facecolor="white", edgecolor="0.5", linewidth=0.5, label="255 ignore"))
    fig.legend(handles=handles, loc=loc, fontsize=7, title="classes", title_fontsize=7, frameon=False)


def binary_bar(fig, image, axes, labels: tuple[str, str], **kwargs) -> None:
    """A two-step colour bar under ``axes`` for a 0 / 1 map drawn as ``image`` (vmin 0, vmax 1)."""
    bar = fig.colorbar(image, ax=axes, location="bottom", ticks=[0.25, 0.75], boundaries=[0, 0.5, 1], values=[0, 1],
                       **kwargs)
    bar.ax.set_xticklabels(labels, fontsize=7)


def continuous_bar(fig, image, axes, label: str, **kwargs) -> None:
    """A colour bar with its range under ``axes`` for the continuous map drawn as ``image``."""
    bar = fig.colorbar(image, ax=axes, location="bottom", **kwargs)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)


def denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def inspect(trainer, source: SegmentationSource, indices: Sequence[int], use_boxes: bool = False) -> list[dict]:
    """One dict of numpy panels per image (images may differ in size, so they run one at a time)."""
    rows = []
    for index in indices:
        sample = load_checked(source, index)
        image = normalize(to_tensor_image(sample.image))[None]
        box_mask = None
        if use_boxes and trainer.box_masks is not None:
            box_mask = torch.as_tensor(trainer.box_masks(index, sample.image.shape[:2]))[None].bool()
            box_mask = box_mask.to(trainer.device)
        out = trainer.framework.pseudo_labels(image.to(trainer.device), box_mask)
        gt = sample.mask if sample.mask is not None else np.full(sample.image.shape[:2], 255, np.uint8)
        rows.append({
            "id": sample.id, "image": denormalise(image[0]), "gt": gt,
            "pseudo": out["pseudo"][0].cpu().numpy(), "confidence": out["confidence"][0].cpu().numpy(),
            "reliable": out["reliable"][0].cpu().numpy(),
            "weight": None if "weight" not in out else out["weight"][0].cpu().numpy(),
        })
    return rows


def save_grid(rows: list[dict], path: Path, weight_range: tuple[float, float] = (0.0, 1.0),
              gt_title: str = "ground truth", class_names: Sequence[str] = (), dataset: str = "") -> Path:
    """:func:`grid_figure` as a PNG."""
    fig = grid_figure(rows, weight_range, gt_title, class_names, dataset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    return path


def grid_figure(rows: list[dict], weight_range: tuple[float, float] = (0.0, 1.0), gt_title: str = "ground truth",
                class_names: Sequence[str] = (), dataset: str = ""):
    """A grid: a row per image; columns image, ground truth, prediction, confidence, reliable, weight; a legend of
    the class colours (``class_names``, ``dataset``'s palette) and a colour bar with its range under each map."""
    Figure = require("matplotlib.figure", "viz", "drawing pictures").Figure
    cols = ["image", gt_title, "pseudo-label / prediction", "confidence", "reliable (bank)", "weight W"]
    fig = Figure(figsize=(2.2 * len(cols) + 1.6, 2.2 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    drawn: dict[int, object] = {}
    for i, row in enumerate(rows):
        panels = [(row["image"], None, None), (colourise(row["gt"], dataset), None, None),
                  (colourise(row["pseudo"], dataset), None, None), (row["confidence"], "magma", (0, 1)),
                  (row["reliable"].astype(float), "gray", (0, 1)),
                  (row["weight"], "viridis", weight_range) if row["weight"] is not None else None]
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
            if panel is None:
                ax.text(0.5, 0.5, "weighting off", ha="center", va="center", fontsize=7)
                continue
            data, cmap, vrange = panel
            kwargs = {} if vrange is None else {"vmin": vrange[0], "vmax": vrange[1]}
            drawn[j] = ax.imshow(data, cmap=cmap, interpolation="nearest", **kwargs)
        axes[i, 0].set_ylabel(str(row["id"]), fontsize=6)
    if 3 in drawn:
        continuous_bar(fig, drawn[3], axes[:, 3], "top-class probability", shrink=0.9)
    if 4 in drawn:
        binary_bar(fig, drawn[4], axes[:, 4], ("not reliable", "reliable"), shrink=0.9)
    if 5 in drawn:
        continuous_bar(fig, drawn[5], axes[:, 5], f"W, {weight_range[0]:g} to {weight_range[1]:g}", shrink=0.9)
    names = list(class_names) or [f"class {c}" for c in range(int(max(
        max(int(r["pseudo"].max()), int(np.where(r["gt"] == 255, 0, r["gt"]).max())) for r in rows)) + 1)]
    class_legend(fig, names, [m for r in rows for m in (r["gt"], r["pseudo"])], dataset)
    return fig


def visualize(config, checkpoint: Path, out_dir: Path, split: str = "unlabelled",
              indices: Optional[Sequence[int]] = None, per_grid: int = 4) -> list[Path]:
    """Load ``checkpoint`` into the config's trainer and write PNG grids of ``indices`` of ``split``."""
    from hafis.engine.checkpoint import load_checkpoint
    from hafis.engine.trainer import Trainer

    state = load_checkpoint(Path(checkpoint))
    trainer = Trainer(config)
    trainer.load_state_dict(state, f"checkpoint {checkpoint}")
    source = {"labelled": trainer.labelled_source, "unlabelled": trainer.unlabelled_source,
              "val": trainer.val_source}[split]
    indices = list(range(min(per_grid, len(source)))) if indices is None else list(indices)
    for i in indices:
        if not 0 <= i < len(source):
            raise DataError(f"image index {i} is outside the {split} split (0..{len(source) - 1})")
    offset = config.weighting.offset
    paths = []
    for start in range(0, len(indices), per_grid):
        rows = inspect(trainer, source, indices[start:start + per_grid], use_boxes=split == "unlabelled")
        paths.append(save_grid(rows, Path(out_dir) / f"{split}_{start // per_grid:03d}.png", (offset, offset + 1),
                               class_names=trainer.class_names, dataset=config.data.dataset))
    return paths
