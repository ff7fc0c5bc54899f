"""The detector's inference: uint8 images in, boxes in pixels with *segmentation* class ids out.

The network's labels ``1..T`` map back to the segmentation classes ``thing_classes[label - 1]``, which everything
after it speaks (the cache, the reliable-pixel rule).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["detect", "image_tensor"]


def image_tensor(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float in [0, 1], what torchvision's detectors take."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[np.ndarray], thing_classes: Sequence[int],
           device: torch.device | str = "cpu") -> list[dict[str, np.ndarray]]:
    """Run the detector on uint8 ``(H, W, 3)`` images; boxes ``(n, 4)`` float32 in pixels, labels in
    *segmentation* class ids, scores float32, highest score first."""
    was_training = model.training
    model.eval()
    lut = torch.as_tensor([-1, *thing_classes], dtype=torch.int64)
    out = model([image_tensor(im).to(device) for im in images])
    model.train(was_training)
    return [{"boxes": o["boxes"].float().cpu().numpy().reshape(-1, 4),
             "labels": lut[o["labels"].cpu()].numpy(),
             "scores": o["scores"].float().cpu().numpy()} for o in out]
