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
from hafis.files import atomic_write
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_tensor_image
from hafis.extras import require


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class ids -> RGB with a 20-colour palette; ignore (255) is white."""
    colormaps = require("matplotlib", "viz", "drawing pictures").colormaps
    palette = (colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(np.uint8)
    rgb = palette[mask.astype(np.int64) % 20]
    rgb[mask == 255] = 255
    return rgb


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
              gt_title: str = "ground truth") -> Path:
    """A PNG grid: a row per image; columns image, ground truth, prediction, confidence, reliable, weight."""
    Figure = require("matplotlib.figure", "viz", "drawing pictures").Figure
    cols = ["image", gt_title, "pseudo-label / prediction", "confidence", "reliable (bank)", "weight W"]
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for i, row in enumerate(rows):
        panels = [(row["image"], None, None), (colourise(row["gt"]), None, None),
                  (colourise(row["pseudo"]), None, None), (row["confidence"], "magma", (0, 1)),
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
            ax.imshow(data, cmap=cmap, interpolation="nearest", **kwargs)
        axes[i, 0].set_ylabel(str(row["id"]), fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    return path


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
        paths.append(save_grid(rows, Path(out_dir) / f"{split}_{start // per_grid:03d}.png", (offset, offset + 1)))
    return paths
