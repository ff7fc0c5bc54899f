"""Evaluation: whole-image or sliding-window inference, batches of mixed image sizes, mIoU, per-class IoU tables.

Published protocols: Pascal VOC is evaluated on the whole image; Cityscapes and COCO with a sliding
window the size of the training crop, moved by 2/3 of it (an overlap of 1/3), the softmax outputs of overlapping
windows averaged. Window positions are ``0, stride, 2*stride, ...`` with the last one flush with the image border
(as mmsegmentation's slide inference), so every window has the full size when the image is at least that large;
UniMatch's loop truncates the last window at the border instead, which changes only the pixels of that margin.
An image no larger than the window is one window: sliding then equals whole-image inference exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from .metrics import confusion_matrix, iou_per_class, mean_iou


def default_stride(window: int) -> int:
    """2/3 of the window (UniMatch: ``int(grid * 2 / 3)``)."""
    return max(1, int(window * 2 / 3))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` pixels, the last window ending at the border."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if size <= window:
        return [0]
    return list(range(0, size - window, stride)) + [size - window]


@torch.no_grad()
def sliding_window_probs(model: nn.Module, images: Tensor, window: int, stride: Optional[int] = None) -> Tensor:
    """``(B, C, H, W)`` class probabilities: the mean softmax of every window covering each pixel."""
    stride = default_stride(window) if stride is None else stride
    b, _, h, w = images.shape
    wh, ww = min(window, h), min(window, w)
    total: Optional[Tensor] = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for y in window_starts(h, window, stride):
        for x in window_starts(w, window, stride):
            probs = model(images[:, :, y:y + wh, x:x + ww]).logits.softmax(dim=1)
            if total is None:
                total = torch.zeros(b, probs.shape[1], h, w, device=images.device, dtype=probs.dtype)
            total[:, :, y:y + wh, x:x + ww] += probs
            count[:, :, y:y + wh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, mode: str = "whole", window: Optional[int] = None,
            stride: Optional[int] = None) -> Tensor:
    """Per-class scores ``(B, C, H, W)`` whose argmax is the prediction: logits (whole) or mean probabilities
    (sliding)."""
    if mode == "whole":
        return model(images).logits
    if mode == "sliding":
        if window is None:
            raise ValueError("sliding-window evaluation needs a window size")
        return sliding_window_probs(model, images, window, stride)
    raise ValueError(f"unknown evaluation mode {mode!r}; valid: whole, sliding")


def eval_collate(samples: Sequence[dict]) -> dict:
    """Stack a batch when its images share one size; otherwise keep lists (each image then runs alone, unpadded,
    so its prediction does not depend on what it was batched with)."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) == 1:
        return default_collate(list(samples))
    return {"image": [s["image"] for s in samples], "mask": [s["mask"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples])}


def eval_batches(batch: dict) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, masks)`` pieces of a collated batch: the batch itself, or one image at a time."""
    if torch.is_tensor(batch["image"]):
        yield batch["image"], batch["mask"]
        return
    for image, mask in zip(batch["image"], batch["mask"], strict=True):
        yield image[None], mask[None]


@dataclass
class EvalResult:
    """mIoU, per-class IoU (``None`` for a class absent from the ground truth) and the confusion matrix."""

    miou: float
    iou: list[Optional[float]]
    confusion: torch.Tensor

    def record(self) -> dict:
        return {"miou": self.miou, "iou": self.iou}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             mode: str = "whole", window: Optional[int] = None, stride: Optional[int] = None) -> EvalResult:
    """One confusion matrix over the set, then per-class IoU and mIoU; ``mode`` whole-image or sliding-window
    (a batch of mixed image sizes runs one image at a time). Under torchrun the ranks' matrices are summed."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in loader:
        for images, masks in eval_batches(batch):
            scores = predict(model, images.to(device), mode, window, stride)
            confusion += confusion_matrix(scores.argmax(dim=1), masks.to(device), num_classes)
    model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)  # each rank evaluated its shard of the set
    confusion = confusion.cpu()
    iou = [None if math.isnan(v) else v for v in iou_per_class(confusion).tolist()]
    return EvalResult(mean_iou(confusion), iou, confusion)


def build_eval_loader(source, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Whole validation images; with ``world_size > 1`` this rank's share (every ``world_size``-th image), whose
    confusion matrix :func:`evaluate` sums over the ranks."""
    from torch.utils.data import Subset

    from hafis.data.ssl import EvalDataset

    dataset = EvalDataset(source)
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=eval_collate,
                      generator=torch.Generator().manual_seed(0))  # never draw from the global RNG


def eval_settings(config) -> dict:
    """``mode``, ``window``, ``stride`` of a :class:`~hafis.config.Config` (window defaults to the crop size)."""
    e = config.eval
    window = e.window if e.window is not None else config.data.crop_size
    return {"mode": e.mode, "window": window, "stride": e.stride if e.stride is not None else default_stride(window)}


def iou_table(iou: Sequence[Optional[float]], class_names: Sequence[str], miou: Optional[float] = None) -> str:
    """A plain-text table of per-class IoU (%) with class names; classes absent from the ground truth show '-'."""
    names = list(class_names) + [f"class {i}" for i in range(len(class_names), len(iou))]
    width = max([len(n) for n in names] + [5])
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for name, value in zip(names, iou, strict=False):
        shown = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:7.2f}"
        lines.append(f"{name:<{width}}  {shown:>7}")
    if miou is not None:
        lines.append(f"{'mIoU':<{width}}  {100 * miou:7.2f}")
    return "\n".join(lines)


__all__ = ["EvalResult", "build_eval_loader", "default_stride", "eval_batches", "eval_collate", "eval_settings",
           "evaluate", "iou_table", "predict", "sliding_window_probs", "window_starts"]
