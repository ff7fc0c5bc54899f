"""AugSeg's intensity operations as released (ZhenZHAO/AugSeg ``augseg/dataset/augs_TIBA.py``: the ``img_aug_*``
functions on PIL images, ``get_augment_list(flag_using_wide=False)``, ``strong_img_aug``) against hafis's tensor
ops (:func:`hafis.frameworks.augseg.apply_intensity_ops`), pixel for pixel, op by op at forced magnitudes and on
random chains; and the magnitudes each released function draws from its uniform, against hafis's draws.

The released functions draw their magnitude inside; here each takes the drawn magnitude as an argument, and
:func:`released_magnitude` is the released mapping from the uniform it draws.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

import hafis.frameworks.augseg as augseg
from hafis.frameworks.augseg import OP_NAMES, apply_intensity_ops, sample_intensity_ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------------------- augs_TIBA.py, transcribed
def released_op(img, name, v):
    """``img_aug_<name>(img, scale)`` with its magnitude ``v`` already drawn."""
    if name == "identity":
        return img
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=v))
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(v)
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(v)
    if name == "color":
        return ImageEnhance.Color(img).enhance(v)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(v)
    if name == "posterize":
        return ImageOps.posterize(img, int(v))
    if name == "solarize":
        return ImageOps.solarize(img, int(v))
    if name == "hue":
        h, s, value = img.convert("HSV").split()
        np_h = np.array(h, dtype=np.uint8)
        # np_h += np.uint8(hue_factor * 255): numpy 1 on x86 truncates the float toward zero and wraps it modulo 256
        # (numpy 2 refuses a negative one)
        np_h += np.uint8(int(v * 255) % 256)
        return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, value)).convert("RGB")
    raise ValueError(name)


#: get_augment_list(flag_using_wide=False): each op's ``scale``
RELEASED_SCALES = {"identity": None, "autocontrast": None, "equalize": None, "blur": [0.1, 2.0],
                   "contrast": [0.05, 0.95], "brightness": [0.05, 0.95], "color": [0.05, 0.95],
                   "sharpness": [0.05, 0.95], "posterize": [4, 8], "solarize": [1, 256], "hue": [0, 0.5]}


def released_magnitude(name, u, u_sign=None):
    """The magnitude ``img_aug_<name>`` computes from its uniform ``u`` (``random.random()``, or
    ``np.random.uniform``'s for the blur) and, for the hue, the sign's ``np.random.random()``."""
    scale = RELEASED_SCALES[name]
    if scale is None:
        return None
    min_v, max_v = min(scale), max(scale)
    if name == "blur":
        return scale[0] + (scale[1] - scale[0]) * u
    if name in ("contrast", "brightness", "color", "sharpness"):
        return max_v - float(max_v - min_v) * u
    if name in ("posterize", "solarize"):
        v = max(1, int(np.ceil(float(max_v - min_v) * u)))
        return max_v - v
    v = float(max_v - min_v) * u + min_v
    return -v if u_sign < 0.5 else v


# ------------------------------------------------------------------------------------------------------------ images
def images(seed):
    """Noise, a smooth gradient with a little noise, a low-contrast patch, one flat channel, and tiny ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1) + rng.integers(-6, 7, (40, 56, 3))
    flat = rng.integers(0, 256, (33, 21, 3))
    flat[..., 1] = 77
    return [rng.integers(0, 256, (40, 56, 3)), smooth, rng.integers(100, 110, (24, 30, 3)), flat,
            rng.integers(0, 256, (2, 5, 3)), rng.integers(0, 256, (1, 1, 3))]


def both(img, ops, device):
    expected = Image.fromarray(img.astype(np.uint8))
    for name, v in ops:
        expected = released_op(expected, name, v)
    tensor = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous().to(device)
    got = apply_intensity_ops(tensor, ops).cpu().permute(1, 2, 0).numpy()
    return np.array(expected), got


MAGNITUDES = {"identity": [None], "autocontrast": [None], "equalize": [None],
              "blur": [0.1, 0.37, 0.5, 1.0, 1.4142, 2.0], "contrast": [0.05, 0.3, 0.5, 0.95],
              "brightness": [0.05, 0.5, 0.95], "color": [0.05, 0.33, 0.95], "sharpness": [0.05, 0.5, 0.95],
              "posterize": [4, 5, 6, 7], "solarize": [1, 128, 255], "hue": [-0.5, -0.3, -0.01, 0.01, 0.2, 0.5]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_equals_the_released_pil_op(name, device):
    for img in images(OP_NAMES.index(name)):
        for v in MAGNITUDES[name]:
            expected, got = both(np.clip(img, 0, 255), [(name, v)], device)
            assert np.array_equal(got, expected), (name, v, img.shape, np.abs(got.astype(int) - expected).max())


@pytest.mark.parametrize("device", DEVICES)
def test_random_chains_equal_the_released_ones(device):
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    for k in range(120):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        img = rng.integers(0, 256, (h, w, 3)) if k % 2 else rng.integers(60, 200, (h, w, 3)) // 3 * 3
        ops = sample_intensity_ops(g, 3, True)
        expected, got = both(img, ops, device)
        assert np.array_equal(got, expected), ops


def test_magnitudes_are_the_released_functions_of_the_same_uniforms():
    """hafis's draws, replayed (op count, op indices, then per op its uniform(s) in float64), mapped by the released
    functions: the same magnitudes."""
    for seed in range(40):
        replay = torch.Generator().manual_seed(seed)
        k = int(torch.randint(1, 4, (1,), generator=replay))
        names = [OP_NAMES[i] for i in torch.randint(len(OP_NAMES), (k,), generator=replay).tolist()]
        expected = []
        for name in names:
            if RELEASED_SCALES[name] is None:
                expected.append((name, None))
                continue
            u = float(torch.rand(1, generator=replay, dtype=torch.float64))
            u_sign = float(torch.rand(1, generator=replay, dtype=torch.float64)) if name == "hue" else None
            expected.append((name, released_magnitude(name, u, u_sign)))
        got = sample_intensity_ops(torch.Generator().manual_seed(seed), 3, True)
        assert [n for n, _ in got] == [n for n, _ in expected]
        assert np.allclose([v or 0.0 for _, v in got], [v or 0.0 for _, v in expected], rtol=0, atol=1e-12)


def test_pil_box_radius_by_hand():
    """PIL's GaussianBlur(σ) runs three box blurs of radius ``l + a`` (Gwosdek et al.): σ = 2 -> σ² / 3 = 4/3,
    box length √17 = 4.12, l = 1, a = 3 · (2 − 4) / (6 · (4/3 − 4)) = 0.375."""
    assert augseg.pil_box_radius(2.0) == pytest.approx(1.375, abs=1e-6)
    assert 0 < augseg.pil_box_radius(0.1) < 0.01
