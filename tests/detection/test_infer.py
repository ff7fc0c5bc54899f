import numpy as np
import torch

from hafis.detection.infer import detect


class _FixedDetector(torch.nn.Module):
    def forward(self, images):
        return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.5, 0.5, 3.0, 3.0]]),
                 "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.99, 0.4])} for _ in images]


def test_detect_maps_detector_labels_to_segmentation_classes():
    out = detect(_FixedDetector(), [np.zeros((8, 8, 3), np.uint8)] * 2, thing_classes=[3, 5])
    assert len(out) == 2
    assert out[0]["labels"].tolist() == [5, 3]
    assert out[0]["boxes"].tolist() == [[1, 2, 5, 6], [0.5, 0.5, 3, 3]]
    assert out[0]["scores"].dtype == np.float32

