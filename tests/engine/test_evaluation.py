"""Sliding-window and whole-image evaluation, mixed image sizes, per-class IoU tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hafis.config import load_config
from hafis.data.base import Sample, SegmentationSource
from hafis.engine.evaluation import (
    build_eval_loader,
    default_stride,
    eval_settings,
    evaluate,
    iou_table,
    predict,
    sliding_window_probs,
    window_starts,
)
from hafis.models import DeepLabV3Plus, SegOutput


class Pointwise(nn.Module):
    """A per-pixel classifier: its output at a pixel does not depend on the window it is computed in."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        logits = self.conv(x)
        return SegOutput(logits=logits, features=logits)


def _halves(rng, h, w):
    """Noise, dark on the left and bright on the right: window means differ a lot from the image mean."""
    image = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    image[:, w // 2:] += 160
    return image


class Context(nn.Module):
    """Per-pixel logits plus a strong term from the mean of its input: predictions depend on the window."""

    def __init__(self, classes=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.local = nn.Parameter(torch.randn(classes, 3, generator=g))
        self.glob = nn.Parameter(2 * torch.randn(classes, 3, generator=g))

    def forward(self, x):
        logits = torch.einsum("kc,bchw->bkhw", self.local, x)
        logits = logits + torch.einsum("kc,bchw->bkhw", self.glob, x.mean(dim=(2, 3), keepdim=True))
        return SegOutput(logits=logits, features=logits)


class Images(SegmentationSource):
    class_names = ("background", "a", "b", "c")

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.samples = [Sample(_halves(rng, h, w),
                               rng.integers(0, 4, (h, w), dtype=np.uint8), str(i)) for i, (h, w) in enumerate(sizes)]
        for s in self.samples:
            s.mask[0, :] = 255

    @property
    def ids(self):
        return [s.id for s in self.samples]

    def load(self, index):
        return self.samples[index]


def tiny_deeplab():
    torch.manual_seed(0)
    return DeepLabV3Plus(4, backbone="resnet_tiny", feature_dim=16, aspp_channels=16).eval()


def test_window_positions_end_at_the_border():
    assert window_starts(2048, 801, default_stride(801)) == [0, 534, 1068, 1247]
    assert window_starts(1024, 801, 534) == [0, 223]
    assert window_starts(500, 801, 534) == [0]
    assert window_starts(801, 801, 534) == [0]
    assert default_stride(513) == 342


def test_sliding_equals_whole_when_the_window_covers_the_image():
    model = tiny_deeplab()
    x = torch.randn(2, 3, 37, 45)
    whole = predict(model, x, "whole")
    sliding = predict(model, x, "sliding", window=45, stride=30)
    torch.testing.assert_close(sliding, whole.softmax(dim=1))
    assert torch.equal(sliding.argmax(1), whole.argmax(1))


def test_sliding_windows_cover_every_pixel_and_average():
    torch.manual_seed(0)
    model = Pointwise().eval()
    x = torch.randn(1, 3, 37, 45)
    probs = sliding_window_probs(model, x, window=16, stride=10)
    torch.testing.assert_close(probs, model(x).logits.softmax(dim=1))
    # a context-dependent model differs between whole and windows: the windows really are smaller crops
    context = Context().eval()
    assert not torch.allclose(sliding_window_probs(context, x, 16, 10), predict(context, x).softmax(1))


def test_evaluate_mixed_sizes_and_modes():
    source = Images([(20, 24), (17, 30), (20, 24)])
    model = Context().eval()
    batched = evaluate(model, build_eval_loader(source, batch_size=3), 4, torch.device("cpu"))
    single = evaluate(model, build_eval_loader(source, batch_size=1), 4, torch.device("cpu"))
    assert torch.equal(batched.confusion, single.confusion)
    assert (batched.confusion.sum(dim=0) > 0).sum() >= 2  # the model predicts more than one class
    assert int(batched.confusion.sum()) == 20 * 24 * 2 + 17 * 30 - 24 * 2 - 30  # row 0 of each image is ignored
    covering = evaluate(model, build_eval_loader(source, 2), 4, torch.device("cpu"), "sliding", window=32)
    assert torch.equal(covering.confusion, single.confusion)
    windows = evaluate(model, build_eval_loader(source, 2), 4, torch.device("cpu"), "sliding", window=12, stride=8)
    assert int(windows.confusion.sum()) == int(single.confusion.sum())
    assert not torch.equal(windows.confusion, single.confusion)


def test_eval_settings_default_to_the_crop_and_two_thirds():
    config = load_config(None, ["data.crop_size=801", "eval.mode=sliding"])
    assert eval_settings(config) == {"mode": "sliding", "window": 801, "stride": 534}
    config = load_config(None, ["eval.mode=sliding", "eval.window=100", "eval.stride=50"])
    assert eval_settings(config) == {"mode": "sliding", "window": 100, "stride": 50}


def test_iou_table_names_every_class():
    table = iou_table([0.5, None, 0.25], ("road", "sky", "car"), miou=0.375)
    lines = table.splitlines()
    assert lines[2].split() == ["road", "50.00"]
    assert lines[3].split() == ["sky", "-"]
    assert lines[-1].split() == ["mIoU", "37.50"]


def test_predict_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown evaluation mode"):
        predict(Pointwise(), torch.zeros(1, 3, 4, 4), "tiled")
