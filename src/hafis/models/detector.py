"""The detector of the method's first step: torchvision Faster R-CNN, trained on the labelled images only.

The paper (docs/method.md, 1) trains a Faster R-CNN ResNet-50-FPN on the labelled subset, without COCO detection
weights, with Adam at lr 5e-5; its boxes come from instance masks, plus connected components for thin classes. Its
detections (cached on disk by :mod:`hafis.engine.detections`) decide which unlabelled pixels feed the prototype bank;
the detector itself never runs inside the training loop.

Architectures (``detector.arch``):

- ``resnet50_fpn``: torchvision's ``fasterrcnn_resnet50_fpn``, the paper's detector (real runs, GPU).
- ``mobilenet_v3_large_fpn``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn``, a lighter alternative.
- ``tiny``: a three-convolution stride-4 backbone with anchors of 8-64 px, for CPU tests and the demo on 32-128 px
  images (torchvision's own anchors start at 32 px, larger than most objects of such images).

Class ids: the network's labels are ``1..T`` (0 is torchvision's background) and map to the segmentation classes
``thing_classes[label - 1]``. Everything outside this module (boxes, the cache, the ensemble rule) speaks
segmentation class ids only.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hafis.data.base import Sample, SegmentationSource, load_checked
from hafis.data.io import boxes_from_connected_components

__all__ = [
    "DETECTOR_ARCHS",
    "sample_boxes",
    "build_detector",
    "DetectionDataset",
    "train_detector",
    "detect",
]

DETECTOR_ARCHS = ("resnet50_fpn", "mobilenet_v3_large_fpn", "tiny")


# ------------------------------------------------------------------------------------------------- boxes
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


# ------------------------------------------------------------------------------------------------- models
class TinyBackbone(nn.Sequential):
    """Three 3x3 conv-BN-ReLU blocks, stride 4, ``out_channels`` wide: a CPU detector for 32-128 px scenes."""

    def __init__(self, width: int = 32, out_channels: int = 64) -> None:
        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        super().__init__(*block(3, width, 2), *block(width, out_channels, 2), *block(out_channels, out_channels, 1))
        self.out_channels = out_channels


def build_detector(arch: str, num_thing_classes: int, *, min_size: int = 512, max_size: int = 1024,
                   score_threshold: float = 0.05, detections_per_image: int = 100,
                   backbone_weights: Optional[str] = None) -> nn.Module:
    """A Faster R-CNN with ``num_thing_classes + 1`` outputs (torchvision's background 0), no pretrained weights.

    ``min_size`` / ``max_size``: torchvision's resize of every input (shorter side to ``min_size`` unless the longer
    side would pass ``max_size``). ``score_threshold``: the lowest score kept at inference (the cache stores all of
    them, so ``weighting.tau_det`` can change without running the detector again). ``backbone_weights``: a local
    torchvision ResNet-50 state dict loaded into ``resnet50_fpn``'s backbone (no download ever happens).
    """
    from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if num_thing_classes < 1:
        raise ValueError("the detector needs at least one thing class")
    num_classes = num_thing_classes + 1
    common = dict(min_size=min_size, max_size=max_size, box_score_thresh=score_threshold,
                  box_detections_per_img=detections_per_image)
    if arch == "resnet50_fpn":
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **common)
        if backbone_weights:
            _load_resnet_weights(model.backbone.body, backbone_weights)
        return model
    if backbone_weights:
        raise ValueError(f"detector.backbone_weights is only supported for resnet50_fpn, not {arch!r}")
    if arch == "mobilenet_v3_large_fpn":
        return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                                 **common)
    if arch == "tiny":
        backbone = TinyBackbone()
        anchors = AnchorGenerator(sizes=((8, 16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        return FasterRCNN(
            backbone, rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(backbone.out_channels * 49, 128), box_predictor=FastRCNNPredictor(128, num_classes),
            rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64, **common,
        )
    raise ValueError(f"unknown detector arch {arch!r}; valid: {', '.join(DETECTOR_ARCHS)}")


def _load_resnet_weights(body: nn.Module, path: str) -> None:
    from hafis.models.backbones import read_weights

    state = read_weights(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = body.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if not matched or missing:
        raise ValueError(f"detector.backbone_weights {path}: {len(matched)} of {len(own)} ResNet-50 keys match; "
                         f"missing e.g. {missing[:5]}")
    body.load_state_dict(matched, strict=False)


# ------------------------------------------------------------------------------------------------- training
def image_tensor(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float in [0, 1], what torchvision's detectors take."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


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
    return tuple(zip(*batch))


def train_detector(model: nn.Module, dataset: DetectionDataset, iterations: int, *, batch_size: int = 4,
                   lr: float = 5e-5, weight_decay: float = 0.0, seed: int = 0, device: torch.device | str = "cpu",
                   num_workers: int = 0, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Adam on the summed Faster R-CNN losses for ``iterations`` steps; returns the loss of every step.

    The authors' recipe is Adam at lr 5e-5 for many epochs; ``lr`` is configurable because a tiny detector trained
    for a few hundred steps (the CPU demo) needs a larger one.
    """
    from hafis.data.ssl import InfiniteSampler

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


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[np.ndarray], thing_classes: Sequence[int],
           device: torch.device | str = "cpu") -> list[dict[str, np.ndarray]]:
    """Run the detector on uint8 ``(H, W, 3)`` images; boxes ``(n, 4)`` float32 in pixels, labels in
    *segmentation* class ids, scores float32, highest score first."""
    was_training = model.training
    model.eval()
    lut = torch.as_tensor([-1, *thing_classes], dtype=torch.int64)
    out = model([image_tensor(im).to(device) for im in images])
    model.train(was_training)
    return [{"boxes": o["boxes"].float().cpu().numpy().reshape(-1, 4),
             "labels": lut[o["labels"].cpu()].numpy(),
             "scores": o["scores"].float().cpu().numpy()} for o in out]

