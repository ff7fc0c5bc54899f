"""What the framework tests share: a stub segmenter whose features are the image itself, and the config that fits
it (D = 3 channels, k = 1, reliable pixels by confidence alone, so no detector is needed)."""

import pytest
import torch
from torch import nn

from hafis.config import load_config
from hafis.models import SegOutput

#: the overrides every stub-based framework config starts from
STUB_OVERRIDES = ("model.feature_dim=3", "weighting.k=1", "weighting.reliable=confidence")


class StubSegmenter(nn.Module):
    """logits = a fixed 1x1 convolution of the image (``scale`` sharpens the confidences), features = the image;
    with ``fp_scale`` the feature-perturbed logits are the convolution of the image times ``fp_scale``."""

    def __init__(self, classes: int = 3, scale: float = 1.0, fp_scale=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.fp_scale = fp_scale
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(classes, 3, 1, 1, generator=g) * scale)
            self.conv.bias.zero_()

    def forward(self, x, feature_perturbation=False):
        out = SegOutput(self.conv(x), x)
        if feature_perturbation and self.fp_scale is not None:
            out.logits_fp = self.conv(x * self.fp_scale)
        return out


@pytest.fixture
def stub_segmenter():
    """The :class:`StubSegmenter` class."""
    return StubSegmenter


@pytest.fixture
def stub_config():
    """``stub_config(*overrides)``: a config for the stub segmenter, ``overrides`` applied last."""
    return lambda *overrides: load_config(None, [*STUB_OVERRIDES, *overrides])


@pytest.fixture
def tiny_deeplab():
    """``tiny_deeplab(classes)``: a seeded tiny DeepLabV3+ in train mode whose BatchNorm running statistics are far
    from a batch's, so eval-mode and train-mode passes differ (the step-level tests against the releases)."""
    from hafis.models import DeepLabV3Plus

    def build(classes: int = 3) -> nn.Module:
        torch.manual_seed(0)
        model = DeepLabV3Plus(classes, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.3, 3.0)
        return model.train()

    return build
