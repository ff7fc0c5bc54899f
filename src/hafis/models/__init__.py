"""Segmentation models. A segmenter returns :class:`SegOutput` (logits at input size + decoder features).

``SEGMENTERS`` maps a config name to a segmenter class ``(num_classes, **kwargs) -> nn.Module`` that lists its
``backbones`` (the ``model.backbone`` names it builds) and its ``config_keys`` (the ``model`` keys only it takes); a
new segmenter registers itself by adding one entry.
"""

from __future__ import annotations

from torch import nn

from hafis.models.backbones import BACKBONES, build_backbone
from hafis.models.deeplabv3plus import DeepLabV3Plus, SegOutput
from hafis.models.dpt import DPT
from hafis.models.segformer import SegFormer

__all__ = ["BACKBONES", "BACKBONES_OF", "DPT", "SEGMENTERS", "DeepLabV3Plus", "SegFormer", "SegOutput",
           "build_backbone", "build_segmenter"]

SEGMENTERS: dict[str, type[nn.Module]] = {
    "deeplabv3plus": DeepLabV3Plus,
    "segformer": SegFormer,
    "dpt": DPT,
}


#: ``model.name`` -> its ``model.backbone`` names (each segmenter's ``backbones``)
BACKBONES_OF = {name: segmenter.backbones for name, segmenter in SEGMENTERS.items()}


def build_segmenter(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the segmenter registered as ``name``; kwargs go to its constructor."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; valid names: {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name](num_classes, **kwargs)
