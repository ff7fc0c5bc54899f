"""DeepLabV3+ (Chen et al., ECCV 2018) as used by UniMatch, U2PL, AEL and AugSeg.

The forward returns the decoder feature (the layer right before the 1x1 classifier) next to the logits, because the
pseudo-label weighting compares per-pixel features with class prototypes. ``feature_perturbation=True`` is UniMatch's
feature perturbation: one backbone pass, the decoder on ``[clean; Dropout2d(clean)]`` encoder features.

With the defaults the network is UniMatch's released DeepLabV3+ layer for layer: every bilinear resize (ASPP's
image pooling, the ASPP output to the low-level size, the logits) uses ``align_corners=True``, and the ASPP
projection has no dropout (the only dropout is the feature perturbation's). :func:`unimatch_state_dict` maps a
UniMatch-released checkpoint onto this module's names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hafis.models.backbones import BACKBONES, build_backbone

__all__ = ["ASPP", "DeepLabV3Plus", "SegOutput", "is_unimatch_state_dict", "unimatch_state_dict"]

#: UniMatch's DeepLabV3+ module names (model/semseg/deeplabv3plus.py) -> this module's; the backbone's are the same
_UNIMATCH_KEYS = (
    (r"head\.b([0-3])\.([01])\.", r"aspp.branches.\1.\2."),
    (r"head\.b4\.gap\.([12])\.", lambda m: f"aspp.branches.4.conv.{int(m.group(1)) - 1}."),
    (r"head\.project\.([01])\.", r"aspp.project.0.\1."),
    (r"fuse\.([0134])\.", lambda m: "fuse.{}.{}.".format(*divmod(int(m.group(1)), 3))),
)


@dataclass
class SegOutput:
    """logits: ``(B, C, H, W)`` at input size. features: ``(B, D, ceil(H/4), ceil(W/4))`` decoder feature (not
    upsampled). logits_fp: feature-perturbed logits ``(B, C, H, W)``, only when requested. aux: an auxiliary head's
    logits at input size and rep: a representation head's output, from segmenters that have them
    (:mod:`hafis.models.released`)."""

    logits: Tensor
    features: Tensor
    logits_fp: Optional[Tensor] = None
    aux: Optional[Tensor] = None
    rep: Optional[Tensor] = None


# a pytree node, so that DistributedDataParallel finds the tensors of a SegOutput (its static graph hooks them)
torch.export.register_dataclass(SegOutput)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """Global-average-pool branch of ASPP, broadcast back to the feature size."""

    def __init__(self, cin: int, cout: int, align_corners: bool = True):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(cin, cout)
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear",
                             align_corners=self.align_corners)


class ASPP(nn.Module):
    """1x1 + three dilated 3x3 + image pooling, concatenated and projected (1x1, BN, ReLU; no dropout, as UniMatch)."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int], align_corners: bool = True):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout)]
            + [_conv_bn_relu(cin, cout, kernel=3, dilation=d) for d in dilations]
            + [_ImagePooling(cin, cout, align_corners)]
        )
        # one-element Sequential: the state-dict keys stay ``aspp.project.0.*`` for checkpoints written with hafis
        self.project = nn.Sequential(_conv_bn_relu(cout * len(self.branches), cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a timm ResNet or EfficientNet-Lite0 (see :mod:`hafis.models.backbones` for names and weights);
    ASPP and the low-level projection take the backbone's channel counts.

    aspp_dilations are given for output stride 16 and doubled for output stride 8, as in the DeepLab papers.
    align_corners: of every bilinear resize in the network (UniMatch and the four frameworks' releases: True).
    multi_grid: the U2PL / AEL / AugSeg releases' multi-grid layer4 (:func:`~hafis.models.backbones.apply_multi_grid`).
    """

    #: the ``model.backbone`` names it builds
    backbones = tuple(BACKBONES)
    #: the ``model`` keys only this segmenter takes (passed to the constructor; another segmenter refuses them)
    config_keys = ("output_stride", "aspp_channels", "multi_grid")

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        output_stride: int = 16,
        feature_dim: int = 256,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        low_level_channels_out: int = 48,
        fp_dropout: float = 0.5,
        pretrained: Optional[str] = None,
        pretrained_path: Optional[str | os.PathLike] = None,
        align_corners: bool = True,
        multi_grid: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        #: read by the weighting, which resizes the decoder features the way the network resizes its logits
        self.align_corners = align_corners
        self.backbone, low_ch, high_ch = build_backbone(backbone, output_stride, pretrained, pretrained_path,
                                                        multi_grid=multi_grid)
        dilations = tuple(d * 16 // output_stride for d in aspp_dilations)
        self.aspp = ASPP(high_ch, aspp_channels, dilations, align_corners)
        self.reduce = _conv_bn_relu(low_ch, low_level_channels_out)
        self.fuse = nn.Sequential(
            _conv_bn_relu(low_level_channels_out + aspp_channels, feature_dim, kernel=3),
            _conv_bn_relu(feature_dim, feature_dim, kernel=3),
        )
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1)
        # A registered module (not UniMatch's inline nn.Dropout2d) so it follows train()/eval() like any layer.
        self.fp_dropout = nn.Dropout2d(fp_dropout)

    def _decode(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        features = self.fuse(torch.cat([self.reduce(low), high], dim=1))
        return self.classifier(features), features

    def forward(self, x: Tensor, feature_perturbation: bool = False) -> SegOutput:
        size = x.shape[-2:]
        low, high = self.backbone(x)
        if feature_perturbation:
            # Independent channel-dropout masks on each level; the clean half passes through unchanged.
            low = torch.cat([low, self.fp_dropout(low)])
            high = torch.cat([high, self.fp_dropout(high)])
        logits, features = self._decode(low, high)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)
        if not feature_perturbation:
            return SegOutput(logits=logits, features=features)
        logits, logits_fp = logits.chunk(2)
        features, _ = features.chunk(2)
        return SegOutput(logits=logits, features=features, logits_fp=logits_fp)

    def param_groups(self, lr: float, head_lr_multiplier: float = 10.0, weight_decay: float = 1e-4) -> list[dict]:
        """SGD groups: backbone at ``lr``, everything else (ASPP, decoder, classifier) at ``lr * multiplier``.

        ``initial_lr`` is stored too: the poly scheduler scales each group from it.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        head_lr = lr * head_lr_multiplier
        return [
            dict(params=list(self.backbone.parameters()), lr=lr, initial_lr=lr, weight_decay=weight_decay),
            dict(params=head, lr=head_lr, initial_lr=head_lr, weight_decay=weight_decay),
        ]


def is_unimatch_state_dict(state: Mapping) -> bool:
    """True for a state dict with UniMatch's DeepLabV3+ names (its ASPP is ``head.*``, hafis's ``aspp.*``)."""
    return any(k.removeprefix("module.").startswith("head.b0.") for k in state)


def unimatch_state_dict(state: Mapping) -> dict:
    """A UniMatch-released DeepLabV3+ state dict (``module.``-prefixed or not) under this module's names.

    The result loads with strict key matching into ``DeepLabV3Plus(backbone='resnet50s' | 'resnet101s')`` with
    UniMatch's widths (ASPP 256, decoder 256); the backbone's ``fc.*``, if any, is dropped.
    """
    return rename_keys(state, _UNIMATCH_KEYS, drop="backbone.fc.")


def rename_keys(state: Mapping, table: Sequence[tuple], drop: Optional[str] = None) -> dict:
    """``state`` without ``module.`` prefixes and keys starting with ``drop``, each key renamed by the first
    ``(pattern, replacement)`` of ``table`` that matches its start."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if drop is not None and key.startswith(drop):
            continue
        for pattern, repl in table:
            key, n = re.subn("^" + pattern, repl, key)
            if n:
                break
        out[key] = value
    return out
