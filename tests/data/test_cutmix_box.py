"""UniMatch's CutMix box: the area is drawn once; only aspect and position are retried."""

import numpy as np
import torch

from hafis.data.transforms import cutmix_box


def released_box(size, rng, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    """UniMatch's ``obtain_cutmix_box`` (util/transform.py) transcribed onto one numpy generator."""
    mask = np.zeros((size, size), np.uint8)
    if rng.random() >= p:
        return mask
    area = rng.uniform(size_min, size_max) * size * size
    while True:
        ratio = rng.uniform(ratio_1, ratio_2)
        cutmix_w, cutmix_h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = rng.integers(0, size), rng.integers(0, size)
        if x + cutmix_w <= size and y + cutmix_h <= size:
            break
    mask[y:y + cutmix_h, x:x + cutmix_w] = 1
    return mask


def test_boxes_equal_the_released_recipe_draw_for_draw():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(300):
        assert np.array_equal(cutmix_box(41, a, p=0.9).numpy(), released_box(41, b, p=0.9))


def test_box_areas_are_not_skewed_small():
    # the area is uniform in [2 %, 40 %] of the crop before flooring the sides: the mean share is near 21 %
    # (redrawing the area on every rejection keeps mostly small ones, about 14 % here)
    rng = np.random.default_rng(0)
    shares = [float(cutmix_box(64, rng, p=1.0).float().mean()) for _ in range(3000)]
    assert 0.19 < float(np.mean(shares)) < 0.22
    assert torch.all(torch.tensor(shares) > 0)
