"""The detector's training data and loop (its networks: :mod:`.networks`; its inference: :mod:`.infer`).

Training boxes come from a labelled sample's instances or from connected components of its mask
(``detector.boxes``); the targets' labels are ``1..T`` (torchvision's background is 0); the loop is Adam on the
summed Faster R-CNN losses.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hafis.data.base import Sample, SegmentationSource, load_checked
from hafis.data.io import boxes_from_connected_components
from hafis.data.ssl import InfiniteSampler

from .infer import image_tensor

__all__ = ["BOX_MODES", "DetectionDataset", "sample_boxes", "train_detector"]

#: ``detector.boxes``: where the training boxes come from (:func:`sample_boxes`)
BOX_MODES = ("auto", "instances", "components", "combined")


def sample_boxes(sample: Sample, thing_classes: Sequence[int], mode: str = "auto", min_area: int = 0,
                 component_classes: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The detector's training boxes of one labelled sample, restricted to ``thing_classes``.

    ``mode``: ``instances`` uses the reader's instance boxes (``Sample.boxes``); ``components`` the connected
    components of the semantic mask; ``auto`` the instance boxes when the sample has any, else components (an image
    whose reader gives no boxes and whose mask has no thing pixels has no boxes either way); ``combined`` (the
    authors' Cityscapes recipe) the instance boxes *and* the connected components of ``component_classes`` (thin
    classes without instances: pole, traffic light, traffic sign), both kept when their class is in
    ``thing_classes``. Components smaller than ``min_area`` pixels give no box.
    """
    if mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {mode!r}; expected one of {', '.join(BOX_MODES)}")
    things = np.asarray(list(thing_classes), np.int64)
    if mode == "combined":
        boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(sample.box_labels, np.int64)
        if sample.mask is not None and len(component_classes):
            comp_boxes, comp_labels = boxes_from_connected_components(sample.mask, list(component_classes), min_area)
            boxes, labels = np.concatenate([boxes, comp_boxes]), np.concatenate([labels, comp_labels])
    elif mode == "instances" or (mode == "auto" and len(sample.boxes)):
        boxes, labels = np.asarray(sample.boxes, np.float32).reshape(-1, 4), np.asarray(sample.box_labels, np.int64)
    elif sample.mask is None:
        raise ValueError(f"sample {sample.id!r} has neither instance boxes nor a mask to take components from")
    else:
        boxes, labels = boxes_from_connected_components(sample.mask, things.tolist(), min_area)
    keep = np.isin(labels, things)
    return boxes[keep], labels[keep]


class DetectionDataset(torch.utils.data.Dataset):
    """Labelled images and their boxes as torchvision detection targets (labels ``1..T``), random h-flip.

    Keys are ``(epoch, index)`` as from :class:`hafis.data.ssl.InfiniteSampler`; the flip is drawn from
    ``(seed, epoch, index)`` so training is reproducible whatever the worker count.
    """

    def __init__(self, source: SegmentationSource, thing_classes: Sequence[int], box_mode: str = "auto",
                 min_area: int = 0, seed: int = 0, flip: bool = True, component_classes: Sequence[int] = ()) -> None:
        self.source, self.thing_classes = source, list(thing_classes)
        self.component_classes = list(component_classes)
        self.box_mode, self.min_area, self.seed, self.flip = box_mode, min_area, seed, flip
        self.lut = {c: i + 1 for i, c in enumerate(self.thing_classes)}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> tuple[Tensor, dict]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = load_checked(self.source, index)
        boxes, labels = sample_boxes(sample, self.thing_classes, self.box_mode, self.min_area,
                                     self.component_classes)
        image = image_tensor(sample.image)
        boxes = torch.from_numpy(boxes)
        if self.flip and np.random.default_rng([self.seed, 7, epoch, index]).random() < 0.5:
            w = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes.reshape(-1, 4),
                  "labels": torch.tensor([self.lut[int(c)] for c in labels], dtype=torch.int64)}
        return image, target


def _collate(batch):
    return tuple(zip(*batch, strict=True))


def train_detector(model: nn.Module, dataset: DetectionDataset, iterations: int, *, batch_size: int = 4,
                   lr: float = 5e-5, weight_decay: float = 0.0, seed: int = 0, device: torch.device | str = "cpu",
                   num_workers: int = 0, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Adam on the summed Faster R-CNN losses for ``iterations`` steps; returns the loss of every step.

    The authors' recipe is Adam at lr 5e-5 for many epochs; ``lr`` is configurable because a tiny detector trained
    for a few hundred steps (the CPU demo) needs a larger one.
    """
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=InfiniteSampler(len(dataset), seed),
                                         collate_fn=_collate, num_workers=num_workers, drop_last=True)
    losses: list[float] = []
    it = iter(loader)
    for step in range(iterations):
        images, targets = next(it)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detector loss is not finite at step {step}: "
                                     f"{ {k: float(v) for k, v in loss_dict.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
