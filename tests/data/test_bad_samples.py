import numpy as np
import pytest
from PIL import Image

from hafis.data.base import DataError, Sample, SegmentationSource
from hafis.data.io import read_image
from hafis.data.ssl import EvalDataset, LabelledDataset


class FileSource(SegmentationSource):
    """One image file and a given mask, 21 classes."""

    class_names = tuple(f"c{i}" for i in range(21))

    def __init__(self, path, mask):
        self.path, self.mask = path, mask

    @property
    def ids(self):
        return ["only"]

    def load(self, index):
        return Sample(read_image(self.path), self.mask, "only")

    def describe(self, index):
        return f"image {self.path}"


def write_png(path, size=(8, 8)):
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)
    return path


def test_label_outside_the_class_range_names_file_and_value(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[3, 4] = 37
    mask[0, 0] = 255  # ignore is fine
    source = FileSource(write_png(tmp_path / "a.png"), mask)
    with pytest.raises(DataError, match=r"a\.png.*label value 37 is outside \[0, 21\)"):
        LabelledDataset(source, 8, (1.0, 1.0), seed=0)[(0, 0)]
    with pytest.raises(DataError, match="37"):
        EvalDataset(source)[0]


def test_corrupt_png_names_the_file(tmp_path):
    path = write_png(tmp_path / "broken.png", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    source = FileSource(path, np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        LabelledDataset(source, 8, (1.0, 1.0), seed=0)[(0, 0)]
