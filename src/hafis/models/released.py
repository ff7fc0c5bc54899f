"""The DeepLabV3+ of the U2PL and AEL releases (``model.decoder: released``), module for module.

It differs from hafis's (UniMatch's) :class:`~hafis.models.deeplabv3plus.DeepLabV3Plus` in the decoder:

* ASPP: image pooling, a 1x1 and three dilated 3x3 branches, concatenated (5 x 256 channels) and *projected by a 3x3
  convolution* + BN + ReLU + ``Dropout2d(0.1)`` (UniMatch: a 1x1 projection, no dropout);
* low-level branch: a 1x1 convolution (with bias) of layer1 to *256* channels (UniMatch: 48);
* fuse: on the 512-channel concatenation, two 3x3 convolutions (with bias), each + BN + ReLU + ``Dropout2d(0.1)``,
  then the 1x1 classifier. The output of the second is the decoder feature the weighting reads (256 channels);
* optional heads: U2PL's representation head (the same two 3x3 blocks on the 512-channel concatenation, then a 1x1
  to 256: ``SegOutput.rep``) and the auxiliary head of both releases (a 3x3 convolution of layer3 to 256 + BN + ReLU
  + ``Dropout2d(0.1)`` + a 1x1 classifier: ``SegOutput.aux``, at input size), which their supervised loss weights by
  0.4 (``model.aux_weight``).

Every resize is bilinear with ``align_corners=True`` and the stem's max-pool rounds up (``ceil_mode``), as released.
Module names are U2PL's (``encoder``, ``decoder.aspp.conv1`` .. ``conv5``, ``decoder.head``, ``decoder.low_conv``,
``decoder.classifier``, ``decoder.representation``, ``auxor.aux``), so a U2PL checkpoint's ``model_state`` /
``teacher_state`` loads strictly after :func:`released_state_dict` (which strips ``module.`` and maps AEL's
``decoder.tail`` / ``decoder.final`` onto ``decoder.classifier``); ``hafis eval --checkpoint`` does both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hafis.models.backbones import build_backbone
from hafis.models.deeplabv3plus import SegOutput, rename_keys

__all__ = ["ReleasedDeepLabV3Plus", "released_state_dict"]

#: the head of the released decoders and of their auxiliary head
WIDTH = 256
#: the released decoders' dropout
DROPOUT = 0.1


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=bias),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _two_blocks(cin: int, cout: int) -> list[nn.Module]:
    """Two (3x3 conv with bias, BN, ReLU, Dropout2d) blocks: the released classifier's and representation's trunk."""
    return [*_conv_bn_relu(cin, WIDTH, 3, bias=True), nn.Dropout2d(DROPOUT),
            *_conv_bn_relu(WIDTH, WIDTH, 3, bias=True), nn.Dropout2d(DROPOUT), nn.Conv2d(WIDTH, cout, 1)]


class _ReleasedASPP(nn.Module):
    """``conv1`` image pooling, ``conv2`` 1x1, ``conv3`` .. ``conv5`` dilated 3x3; concatenated in that order."""

    def __init__(self, cin: int, width: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, width, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, width, 1))
        for i, d in enumerate(dilations):
            setattr(self, f"conv{i + 3}", nn.Sequential(*_conv_bn_relu(cin, width, 3, dilation=d)))
        self.out_channels = width * (2 + len(dilations))
        self.branches = 2 + len(dilations)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.conv1(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([pooled] + [getattr(self, f"conv{i}")(x) for i in range(2, self.branches + 1)], dim=1)


class _ReleasedDecoder(nn.Module):
    def __init__(self, low_ch: int, high_ch: int, num_classes: int, dilations: Sequence[int],
                 representation: bool) -> None:
        super().__init__()
        self.aspp = _ReleasedASPP(high_ch, WIDTH, dilations)
        self.head = nn.Sequential(*_conv_bn_relu(self.aspp.out_channels, WIDTH, 3), nn.Dropout2d(DROPOUT))
        self.low_conv = nn.Sequential(*_conv_bn_relu(low_ch, WIDTH, 1, bias=True))
        self.classifier = nn.Sequential(*_two_blocks(2 * WIDTH, num_classes))
        self.representation = nn.Sequential(*_two_blocks(2 * WIDTH, WIDTH)) if representation else None

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(logits, decoder feature, representation or None)`` at the low-level resolution."""
        low = self.low_conv(low)
        high = F.interpolate(self.head(self.aspp(high)), size=low.shape[-2:], mode="bilinear", align_corners=True)
        joint = torch.cat([low, high], dim=1)
        features = self.classifier[:-1](joint)
        rep = self.representation(joint) if self.representation is not None else None
        return self.classifier[-1](features), features, rep


class ReleasedDeepLabV3Plus(nn.Module):
    """U2PL's / AEL's DeepLabV3+ on a hafis ResNet (see the module docstring).

    aspp_dilations are given for output stride 16 and doubled for output stride 8 (the releases: 12, 24, 36 at 8).
    aux_head: build the auxiliary head on layer3; representation: build U2PL's representation head.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101s",
        output_stride: int = 8,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        multi_grid: bool = True,
        aux_head: bool = False,
        representation: bool = False,
        pretrained: Optional[str] = None,
        pretrained_path: Optional[str | os.PathLike] = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = WIDTH
        #: read by the weighting, which resizes the decoder features the way the network resizes its logits
        self.align_corners = True
        self.encoder, low_ch, high_ch = build_backbone(backbone, output_stride, pretrained, pretrained_path,
                                                       multi_grid=multi_grid, out_indices=(1, 3, 4))
        self.encoder.maxpool.ceil_mode = True  # the released ResNets' max-pool
        dilations = tuple(d * 16 // output_stride for d in aspp_dilations)
        self.decoder = _ReleasedDecoder(low_ch, high_ch, num_classes, dilations, representation)
        #: U2PL takes this head instead of building its own
        self.has_representation = representation
        self.auxor = None
        if aux_head:
            mid_ch = self.encoder.feature_info.channels()[1]
            self.auxor = nn.Module()
            self.auxor.aux = nn.Sequential(*_conv_bn_relu(mid_ch, WIDTH, 3, bias=True), nn.Dropout2d(DROPOUT),
                                           nn.Conv2d(WIDTH, num_classes, 1))

    def forward(self, x: Tensor, feature_perturbation: bool = False) -> SegOutput:
        if feature_perturbation:
            raise ValueError("the released U2PL / AEL decoder has no feature perturbation (UniMatch's); use "
                             "model.decoder=unimatch with train.framework=unimatch")
        size = x.shape[-2:]
        low, mid, high = self.encoder(x)
        logits, features, rep = self.decoder(low, high)
        aux = None
        if self.auxor is not None:
            aux = F.interpolate(self.auxor.aux(mid), size=size, mode="bilinear", align_corners=True)
        return SegOutput(logits=F.interpolate(logits, size=size, mode="bilinear", align_corners=True),
                         features=features, aux=aux, rep=rep)

    def param_groups(self, lr: float, head_lr_multiplier: float = 10.0, weight_decay: float = 1e-4) -> list[dict]:
        """SGD groups: the encoder at ``lr``, decoder and auxiliary head at ``lr * multiplier`` (as released)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        head = [p for p in self.parameters() if id(p) not in encoder_ids]
        head_lr = lr * head_lr_multiplier
        return [dict(params=list(self.encoder.parameters()), lr=lr, initial_lr=lr, weight_decay=weight_decay),
                dict(params=head, lr=head_lr, initial_lr=head_lr, weight_decay=weight_decay)]


#: AEL's decoder names -> U2PL's (its ``tail`` is U2PL's classifier without the last 1x1, ``final`` that 1x1)
_AEL_KEYS = ((r"decoder\.tail\.", "decoder.classifier."), (r"decoder\.final\.", "decoder.classifier.8."))


def released_state_dict(state: Mapping) -> dict:
    """A U2PL or AEL checkpoint's ``model_state`` / ``teacher_state`` (``module.``-prefixed or not) under
    :class:`ReleasedDeepLabV3Plus`'s names; it then loads with strict key matching into the network built with the
    same heads (U2PL: ``representation``; both: ``aux_head`` where the config has ``aux_loss``)."""
    return rename_keys(state, _AEL_KEYS)
