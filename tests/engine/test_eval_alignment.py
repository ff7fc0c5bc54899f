"""Predictions sit on the pixels they predict, in whole-image and sliding-window evaluation and in ``hafis predict``.

Neither evaluation nor prediction resizes an image, logits or a mask: the network runs on the whole image or on
windows cut from it, its scores are pasted back where the windows came from, and masks are scored / written at the
image's own size (the only resizes are the network's own, as its release does them). The stand-in network here
reads, at every pixel, the grey level of one input channel and predicts it as the class. On a ramp image (channel 0
the column, channel 1 the row) the predicted map must be the ramp: the measured offset is the mean of
(predicted - true) position, and any misplaced window, flip, transposition or resize would move it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hafis.data.base import Sample, SegmentationSource
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_tensor_image
from hafis.engine.evaluation import build_eval_loader, evaluate, predict
from hafis.engine.inference import Predictor, predict_files
from hafis.models import SegOutput

CLASSES = 96  # grey levels 0..95: every position of the images below
SIZES = [(37, 53), (61, 90)]
MODES = [("whole", None, None), ("sliding", 32, 20), ("sliding", 24, None), ("sliding", 128, None)]


class GreyLevel(nn.Module):
    """At each pixel, logits ``-(g - c)²`` over the classes ``c``: the class is the grey level ``g`` of input channel
    ``channel`` (un-normalised), whatever window the pixel is seen in."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.classes = torch.arange(CLASSES, dtype=torch.float32).view(1, CLASSES, 1, 1)

    def forward(self, x):
        c = self.channel
        grey = (x[:, c:c + 1] * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255.0
        logits = -(grey - self.classes) ** 2
        return SegOutput(logits=logits, features=logits)


def ramp(h: int, w: int) -> np.ndarray:
    """``(h, w, 3)`` uint8: channel 0 the column, channel 1 the row."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)


def offsets(label_x: np.ndarray, label_y: np.ndarray) -> tuple[float, float]:
    """Mean predicted minus true column and row, in pixels."""
    y, x = np.mgrid[0:label_x.shape[0], 0:label_x.shape[1]]
    return float((label_x.astype(np.float64) - x).mean()), float((label_y.astype(np.float64) - y).mean())


def assert_on_ramp(label_x, label_y, h, w):
    dx, dy = offsets(label_x, label_y)
    assert abs(dx) < 0.05 and abs(dy) < 0.05, (dx, dy)
    expected = ramp(h, w)
    assert np.array_equal(label_x, expected[..., 0]) and np.array_equal(label_y, expected[..., 1])


@pytest.mark.parametrize("mode,window,stride", MODES, ids=["whole", "windows-32-20", "windows-24", "one-window"])
def test_whole_and_sliding_predictions_sit_on_their_pixels(mode, window, stride):
    for h, w in SIZES:
        x = normalize(to_tensor_image(ramp(h, w)))[None]
        label_x, label_y = (predict(GreyLevel(c), x, mode, window, stride).argmax(1)[0].numpy() for c in (0, 1))
        assert_on_ramp(label_x, label_y, h, w)


class Ramps(SegmentationSource):
    """Ramp images of mixed sizes whose masks are their column index (or row index)."""

    class_names = tuple(str(i) for i in range(CLASSES))

    def __init__(self, channel: int):
        self.channel = channel

    @property
    def ids(self):
        return [str(i) for i in range(len(SIZES))]

    def load(self, index):
        image = ramp(*SIZES[index])
        return Sample(image, image[..., self.channel].copy(), str(index))


@pytest.mark.parametrize("mode,window,stride", MODES[:2], ids=["whole", "windows-32-20"])
def test_evaluation_scores_the_ramp_perfectly(mode, window, stride):
    """Mixed sizes in one batch (each image then runs alone): every pixel is predicted as its own position."""
    for channel in (0, 1):
        loader = build_eval_loader(Ramps(channel), batch_size=2)
        result = evaluate(GreyLevel(channel), loader, CLASSES, torch.device("cpu"), mode, window, stride)
        assert result.confusion.sum() == sum(h * w for h, w in SIZES)
        assert result.confusion.sum() == result.confusion.diag().sum()


@pytest.mark.parametrize("mode,window", [("whole", None), ("sliding", 32)])
def test_predict_api_and_files_sit_on_their_pixels(tmp_path, mode, window):
    h, w = SIZES[1]
    image = ramp(h, w)
    Image.fromarray(image).save(tmp_path / "ramp.png")
    labels = {}
    for channel in (0, 1):
        predictor = Predictor(GreyLevel(channel), CLASSES, mode=mode, window=window, stride=20)
        tensor = torch.from_numpy(image).permute(2, 0, 1)
        outputs = [predictor(Image.fromarray(image)), predictor(image), predictor(tensor).numpy(),
                   predictor(tensor.float() / 255).numpy()]
        predict_files(predictor, [tmp_path / "ramp.png"], tmp_path / f"out{channel}", progress=False)
        outputs.append(np.array(Image.open(tmp_path / f"out{channel}" / "ramp.png")))
        labels[channel] = outputs
    for label_x, label_y in zip(labels[0], labels[1], strict=True):
        assert_on_ramp(label_x, label_y, h, w)
