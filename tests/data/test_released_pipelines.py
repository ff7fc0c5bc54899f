"""The PIL-based releases' training-time data pipelines, transcribed, against hafis's labelled and unlabelled
samples pixel for pixel, on VOC-sized (500 x 375) and Cityscapes-sized (2048 x 1024) images at the releases' crops.

- UniMatch (LiheYoung/UniMatch ``dataset/transform.py``, ``dataset/semi.py``): ``resize`` (the long side an integer
  in ``int(L · 0.5) .. int(L · 2.0)``), ``crop`` (padding bottom / right: image 0, mask 255, the unlabelled mask 254
  -> ignore 255), ``hflip``; the strong views ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` p 0.8, ``RandomGrayscale`` p 0.2,
  ``blur`` p 0.5; ``obtain_cutmix_box``.
- UniMatch V2 (LiheYoung/UniMatch-V2 ``dataset/semi.py``): the same calls with the same arguments (its unlabelled
  mask is all zeros instead of the file, so its ignore region is the padding too), at its crops 518 / 798.
- AugSeg (ZhenZHAO/AugSeg ``augseg/dataset/augs_TIBA.py``; ``pascal_voc.py`` / ``cityscapes.py`` build
  ``Resize, RandomFlip, Crop``): the long side drawn around ``resize_base_size`` (500 on VOC; ``[1024, 2048]`` on
  Cityscapes, a continuous factor), the flip *before* the crop, padding bottom / right with
  ``np.uint8(255 · ImageNet mean)`` and 255, the same transform for both streams (crop 513 / 800).

The releases draw from ``random`` / ``numpy`` / ``torch``; here each transcription takes its draws as arguments and
the test replays hafis's documented draw order on the sample's own generator (``sample_rng``): the geometry
(``draw_geometry``: size, crop row, crop column, flip), then per strong view ``strong_colour``'s draws and
``cutmix_box``'s. Given equal draws, masks, ignore regions, box masks, CutMix boxes and strong views (from equal
weak images) are equal exactly; the weak image (torch's antialiased bilinear) is PIL's ``BILINEAR`` within 2 grey
levels on a measured share of its pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image, ImageFilter, ImageOps

from hafis.data.base import Sample, SegmentationSource
from hafis.data.ssl import LABELLED_STREAM, UNLABELLED_STREAM, LabelledDataset, UnlabelledDataset, sample_rng
from hafis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_image
from hafis.frameworks.augseg import AugSeg
from hafis.frameworks.unimatch import UniMatch
from hafis.frameworks.unimatch_v2 import UniMatchV2

SEED, C = 11, 21
VOC, CITYSCAPES = (375, 500), (1024, 2048)
#: a weak image against PIL's BILINEAR (torch's antialiased bilinear, measured over every long side of a 500 x 375
#: noise image): at most 2 grey levels apart, on 0.3 % of the pixels on average, 7.9 % at worst (long side 400)
WEAK_LEVELS, WEAK_SHARE, WEAK_MEAN_SHARE = 2, 0.08, 0.01


# ------------------------------------------------------------------------------------------ the releases, transcribed
# Each operation takes the image and a list of label-like planes (the mask, then the maps the releases do not have,
# such as the box masks), which go through the mask's operations.
def unimatch_resize(img, masks, long_side):
    """``resize``; ``long_side`` is its ``random.randint(int(max(h, w) * 0.5), int(max(h, w) * 2.0))``."""
    w, h = img.size
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), [m.resize((ow, oh), Image.NEAREST) for m in masks]


def unimatch_crop(img, masks, size, fills, x, y):
    """``crop`` (``fills``: its ``ignore_value`` per plane); ``x``, ``y`` are its ``random.randint(0, w - size)``,
    ``random.randint(0, h - size)``."""
    w, h = img.size
    padw = size - w if w < size else 0
    padh = size - h if h < size else 0
    img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
    masks = [ImageOps.expand(m, border=(0, 0, padw, padh), fill=f) for m, f in zip(masks, fills, strict=True)]
    box = (x, y, x + size, y + size)
    return img.crop(box), [m.crop(box) for m in masks]


def hflip(img, masks, flip):
    """UniMatch's ``hflip`` and AugSeg's ``RandomFlip``; ``flip`` is their ``random.random() < 0.5``."""
    if flip:
        img, masks = img.transpose(Image.FLIP_LEFT_RIGHT), [m.transpose(Image.FLIP_LEFT_RIGHT) for m in masks]
    return img, masks


def unimatch_strong(img, jitter, grey, sigma):
    """One strong view: ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` when ``jitter`` = (its ``fn_idx`` order, its four
    factors), ``RandomGrayscale`` when ``grey``, ``blur`` with radius ``sigma`` when not None."""
    if jitter is not None:
        order, (b, c, s, h) = jitter
        for fn_id in order:
            if fn_id == 0:
                img = TVF.adjust_brightness(img, b)
            elif fn_id == 1:
                img = TVF.adjust_contrast(img, c)
            elif fn_id == 2:
                img = TVF.adjust_saturation(img, s)
            else:
                img = TVF.adjust_hue(img, h)
    if grey:
        img = img.convert("L").convert("RGB")
    if sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
    return img


def unimatch_cutmix_box(img_size, box):
    """``obtain_cutmix_box``; ``box`` is its accepted ``(x, y, cutmix_w, cutmix_h)`` or None (no box)."""
    mask = np.zeros((img_size, img_size), np.uint8)
    if box is not None:
        x, y, cutmix_w, cutmix_h = box
        mask[y:y + cutmix_h, x:x + cutmix_w] = 1
    return mask


def unimatch_sample(img, mask, size, mode, draws, box_mask=None):
    """``SemiDataset.__getitem__`` for ``train_l`` / ``train_u`` as uint8 arrays (before ``normalize``); the box
    mask planes through the mask's path with padding 0."""
    long_side, x, y, flip = draws["geometry"]
    planes = [mask] + ([Image.fromarray(m) for m in box_mask] if box_mask is not None else [])
    fills = [254 if mode == "train_u" else 255] + [0] * (len(planes) - 1)
    img, planes = unimatch_resize(img, planes, long_side)
    img, planes = unimatch_crop(img, planes, size, fills, x, y)
    img, planes = hflip(img, planes, flip)
    out = {"image": np.array(img), "mask": np.array(planes[0])}
    if mode == "train_u":
        out["ignore"] = np.where(out["mask"] == 254, 255, 0)
    if box_mask is not None:
        out["box_mask"] = np.stack([np.array(m) for m in planes[1:]])
    return out


def augseg_resize(img, masks, base_size, draw):
    """``Resize(base_size, [0.5, 2.0])``: an int ``base_size`` takes ``draw`` as its ``long_side`` (``random.randint(
    int(base_size * 0.5), int(base_size * 2.0))``), a pair takes it as its ``scale`` (``0.5 + random.random() * 1.5``).
    """
    w, h = img.size
    if isinstance(base_size, int):
        long_side = draw
        if h > w:
            oh, ow = long_side, int(1.0 * long_side * w / h + 0.5)
        else:
            oh, ow = int(1.0 * long_side * h / w + 0.5), long_side
    else:
        oh, ow = int(base_size[0] * draw), int(base_size[1] * draw)
    return img.resize((ow, oh), Image.BILINEAR), [m.resize((ow, oh), Image.NEAREST) for m in masks]


def augseg_crop(img, masks, crop_size, fills, x, y, mean=(0.485, 0.456, 0.406)):
    """``Crop(crop_size, "rand")``: ``cv2.copyMakeBorder`` of the float32 image with ``255 · mean`` (and of the
    int32 label with its ``ignore_value``: ``fills``) on the bottom and right, cast back with ``np.uint8``; ``x``,
    ``y`` are its ``random.randint(0, w - crop_w)``, ``random.randint(0, h - crop_h)``."""
    w, h = img.size
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h > 0 or pad_w > 0:
        fill = (np.array(mean) * 255.0).tolist()
        image = np.asarray(img, dtype=np.float32)
        image = np.stack([np.pad(image[..., c], ((0, pad_h), (0, pad_w)), constant_values=fill[c])
                          for c in range(3)], axis=-1)
        img = Image.fromarray(np.uint8(image))
        masks = [Image.fromarray(np.uint8(np.pad(np.asarray(m, dtype=np.int32), ((0, pad_h), (0, pad_w)),
                                                 constant_values=f))) for m, f in zip(masks, fills, strict=True)]
    box = (x, y, x + crop_size, y + crop_size)
    return img.crop(box), [m.crop(box) for m in masks]


def augseg_sample(img, label, base_size, crop_size, draws, box_mask=None):
    """``Compose([Resize, RandomFlip, Crop])`` on an image and its label (ignore 255), plus the padding region (the
    release has no ignore map: this is where its ``Crop`` padded, a zero plane padded with 255) and the box mask
    planes through the label's path with padding 0."""
    resize_draw, x, y, flip = draws
    planes = [label, Image.new("L", img.size, 0)] + \
        ([Image.fromarray(m) for m in box_mask] if box_mask is not None else [])
    fills = [255, 255] + [0] * (len(planes) - 2)
    img, planes = augseg_resize(img, planes, base_size, resize_draw)
    img, planes = hflip(img, planes, flip)
    img, planes = augseg_crop(img, planes, crop_size, fills, x, y)
    out = {"image": np.array(img), "mask": np.array(planes[0]), "padding": np.array(planes[1])}
    if box_mask is not None:
        out["box_mask"] = np.stack([np.array(m) for m in planes[2:]])
    return out


# ------------------------------------------------------------------------------- hafis's draws, in its documented order
def replay_geometry(rng, h, w, crop, scale=(0.5, 2.0)):
    """``draw_geometry``'s order with the long-side draw: long side, crop row, crop column, flip. Returns the
    release's ``(long_side, x, y, flip)``."""
    long_side = int(rng.integers(int(max(h, w) * scale[0]), int(max(h, w) * scale[1]) + 1))
    oh, ow = (long_side, int(1.0 * w * long_side / h + 0.5)) if h > w else \
        (int(1.0 * h * long_side / w + 0.5), long_side)
    y = int(rng.integers(0, max(oh, crop) - crop + 1))
    x = int(rng.integers(0, max(ow, crop) - crop + 1))
    return long_side, x, y, bool(rng.random() < 0.5)


def replay_strong(rng):
    """``strong_colour``'s order: p 0.8, the brightness, contrast, saturation and hue factors, their order (a
    permutation); p 0.2 grey; p 0.5, σ."""
    jitter = None
    if rng.random() < 0.8:
        factors = [rng.uniform(0.5, 1.5) for _ in range(3)] + [rng.uniform(-0.25, 0.25)]
        jitter = ([int(i) for i in rng.permutation(4)], factors)
    grey = bool(rng.random() < 0.2)
    sigma = rng.uniform(0.1, 2.0) if rng.random() < 0.5 else None
    return jitter, grey, sigma


def replay_box(rng, size, p=0.5):
    """``cutmix_box``'s order: p; the area once; then (ratio, x, y) until the box fits."""
    if rng.random() >= p:
        return None
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        cutmix_w, cutmix_h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + cutmix_w <= size and y + cutmix_h <= size:
            return x, y, cutmix_w, cutmix_h


def replay_unlabelled(rng, h, w, crop):
    draws = {"geometry": replay_geometry(rng, h, w, crop)}
    draws["strong1"], draws["box1"] = replay_strong(rng), replay_box(rng, crop)
    draws["strong2"], draws["box2"] = replay_strong(rng), replay_box(rng, crop)
    return draws


# ------------------------------------------------------------------------------------------------------- the samples
class OneImage(SegmentationSource):
    class_names = tuple(f"c{i}" for i in range(C))

    def __init__(self, image, mask):
        self.image, self.mask = image, mask

    @property
    def ids(self):
        return ["only"]

    def load(self, index):
        return Sample(self.image, self.mask, "only")


def scene(hw, seed):
    """Noise pixels (the worst case for the bilinear filters), a label on every pixel (all classes and 255), a
    three-class box mask of random rectangles."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    mask = rng.integers(0, C, hw).astype(np.uint8)
    mask[rng.random(hw) < 0.05] = 255
    boxes = np.zeros((3,) + hw, np.uint8)
    for k in range(3):
        y0, x0 = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
        boxes[k, y0:y0 + hw[0] // 3, x0:x0 + hw[1] // 4] = 1
    return image, mask, boxes


def to_uint8(x):
    """Undo ``normalize`` (exact for a normalised uint8 image)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def assert_weak(got, expected):
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= WEAK_LEVELS and (diff > 0).mean() <= WEAK_SHARE, (diff.max(), (diff > 0).mean())


def hafis_samples(geometry, hw, crop, keys, seed=0):
    image, mask, boxes = scene(hw, seed)
    source = OneImage(image, mask)
    labelled = LabelledDataset(source, crop, (0.5, 2.0), SEED, geometry=geometry)
    unlabelled = UnlabelledDataset(source, crop, (0.5, 2.0), SEED, box_masks=lambda i, size: torch.from_numpy(boxes),
                                   geometry=geometry)
    return image, mask, boxes, [(key, labelled[key], unlabelled[key]) for key in keys]


def unlabelled_mask(source, mask, crop, geometry, key, seed=SEED):
    """The ground truth through the unlabelled stream's geometry (255 on the padding): the stream carries no ground
    truth, so it goes in as a label-like map of its own, one channel per value, and is read back."""
    values = np.unique(mask)
    onehot = torch.from_numpy((mask[None] == values[:, None, None]).astype(np.uint8))
    data = UnlabelledDataset(source, crop, (0.5, 2.0), seed, box_masks=lambda i, size: onehot, geometry=geometry,
                             strong_views=False)
    channels = data[key]["box_mask"]
    decoded = torch.from_numpy(values.astype(np.int64))[channels.int().argmax(0)]
    return torch.where(channels.any(0), decoded, torch.full_like(decoded, 255)).numpy()


def test_weak_images_are_pil_bilinear_within_the_measured_bound():
    """The resize behind every weak image, over long-side draws of a 500 x 375 noise image (its worst one, 400,
    among them): within 2 grey levels, on at most 7.9 % of one image's pixels, under 1 % on average (measured over
    all 751 long sides: 0.31 % on average, 2 levels at 1.3 % of them)."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, VOC + (3,), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    shares = []
    for long_side in [400] + [int(v) for v in rng.integers(250, 1001, 19)]:
        size = (int(1.0 * VOC[0] * long_side / VOC[1] + 0.5), long_side)
        expected = np.array(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)).astype(int)
        diff = np.abs(resize_image(tensor, size).permute(1, 2, 0).numpy().astype(int) - expected)
        assert diff.max() <= WEAK_LEVELS
        shares.append((diff > 0).mean())
    assert max(shares) <= WEAK_SHARE and shares[0] > 0.05  # the worst draw is as measured
    assert np.mean(shares[1:]) <= WEAK_MEAN_SHARE


# ----------------------------------------------------------------------------------------------------------- UniMatch
def test_unimatch_v2_uses_unimatchs_pipeline():
    """V2's ``semi.py`` calls ``resize``, ``crop``, ``hflip``, ``blur`` and ``obtain_cutmix_box`` as UniMatch's
    does: one geometry, tested below at both releases' crops."""
    assert UniMatchV2.traits.geometry == UniMatch.traits.geometry


@pytest.mark.parametrize("release, hw, crop, keys", [
    ("unimatch", VOC, 321, [(0, 0), (1, 0), (2, 0), (3, 0)]),
    ("unimatch_v2", VOC, 518, [(0, 0), (1, 0), (5, 0)]),
    ("unimatch", CITYSCAPES, 801, [(0, 0), (3, 0)]),
    ("unimatch_v2", CITYSCAPES, 798, [(1, 0)]),
], ids=["unimatch-voc-321", "unimatch_v2-voc-518", "unimatch-cityscapes-801", "unimatch_v2-cityscapes-798"])
def test_unimatch_samples_equal_the_release(release, hw, crop, keys):
    framework = UniMatch if release == "unimatch" else UniMatchV2
    image, mask, boxes, samples = hafis_samples(framework.traits.geometry, hw, crop, keys)
    pil_image, pil_mask = Image.fromarray(image), Image.fromarray(mask)
    padded = 0
    for (epoch, index), lab, unl in samples:
        draws = {"geometry": replay_geometry(sample_rng(SEED, LABELLED_STREAM, epoch, index), *hw, crop)}
        expected = unimatch_sample(pil_image, pil_mask, crop, "train_l", draws)
        assert_weak(to_uint8(lab["image"]), expected["image"])
        assert np.array_equal(lab["mask"].numpy(), expected["mask"])

        draws = replay_unlabelled(sample_rng(SEED, UNLABELLED_STREAM, epoch, index), *hw, crop)
        expected = unimatch_sample(pil_image, pil_mask, crop, "train_u", draws, box_mask=boxes)
        weak = to_uint8(unl["weak"])
        assert_weak(weak, expected["image"])
        assert np.array_equal(unl["ignore"].numpy(), expected["ignore"])
        gt = unlabelled_mask(OneImage(image, mask), mask, crop, framework.traits.geometry, (epoch, index))
        assert np.array_equal(gt, np.where(expected["mask"] == 254, 255, expected["mask"]))
        assert np.array_equal(unl["box_mask"].numpy(), expected["box_mask"].astype(bool))
        for view in ("1", "2"):
            # the strong view of hafis's weak image by the release's operations
            strong = np.array(unimatch_strong(Image.fromarray(weak), *draws["strong" + view]))
            assert np.array_equal(to_uint8(unl["strong" + view]), strong)
            box = unimatch_cutmix_box(crop, draws["box" + view])
            assert np.array_equal(unl["box" + view].numpy(), box.astype(bool))
        padded += int((expected["ignore"] == 255).sum())
    if hw == VOC:
        assert padded > 0  # the unlabelled padding was exercised


# ------------------------------------------------------------------------------------------------------------ AugSeg
def augseg_draw(rng, hw, crop, base_size):
    """hafis's geometry draw, and the release's resize draw that gives the same size: the long side itself for an
    int ``base_size``; for a pair, the scale ``(k + ½) / W`` that makes ``int(W · s) = k`` and ``int(H · s) = ⌊k/2⌋``
    (hafis's short side is ``int(k/2 + ½)``: the same for even ``k``)."""
    long_side, x, y, flip = replay_geometry(rng, *hw, crop)
    resize_draw = long_side if isinstance(base_size, int) else (long_side + 0.5) / base_size[1]
    return long_side, (resize_draw, x, y, flip)


@pytest.mark.parametrize("hw, crop, base_size, keys", [
    (VOC, 513, 500, [(0, 0), (1, 0), (2, 0), (4, 0)]),
    (CITYSCAPES, 800, (1024, 2048), [(15, 0), (28, 0)]),
], ids=["voc-513", "cityscapes-800"])
def test_augseg_samples_equal_the_release(hw, crop, base_size, keys):
    image, mask, boxes, samples = hafis_samples(AugSeg.traits.geometry, hw, crop, keys)
    pil_image, pil_mask = Image.fromarray(image), Image.fromarray(mask)
    flipped_and_padded = 0
    for (epoch, index), lab, unl in samples:
        long_side, draws = augseg_draw(sample_rng(SEED, LABELLED_STREAM, epoch, index), hw, crop, base_size)
        assert long_side % 2 == 0 or isinstance(base_size, int)  # keys chosen so the release can give this size
        expected = augseg_sample(pil_image, pil_mask, base_size, crop, draws)
        assert_weak(to_uint8(lab["image"]), expected["image"])
        assert np.array_equal(lab["mask"].numpy(), expected["mask"])

        long_side, draws = augseg_draw(sample_rng(SEED, UNLABELLED_STREAM, epoch, index), hw, crop, base_size)
        assert long_side % 2 == 0 or isinstance(base_size, int)
        expected = augseg_sample(pil_image, pil_mask, base_size, crop, draws, box_mask=boxes)
        assert_weak(to_uint8(unl["weak"]), expected["image"])
        assert np.array_equal(unl["ignore"].numpy(), expected["padding"])
        gt = unlabelled_mask(OneImage(image, mask), mask, crop, AugSeg.traits.geometry, (epoch, index))
        assert np.array_equal(gt, expected["mask"])
        assert np.array_equal(unl["box_mask"].numpy(), expected["box_mask"].astype(bool))
        flipped_and_padded += int(draws[3] and (expected["padding"] == 255).any())
    if hw == VOC:
        assert flipped_and_padded > 0  # a flipped crop with padding: the padding stays bottom / right


def test_augseg_cityscapes_short_side_is_one_row_longer_for_odd_long_sides():
    """The named departure: on Cityscapes the release draws a continuous factor ``s`` and takes
    ``(int(1024 s), int(2048 s))``; hafis draws the long side ``k`` and rounds the short side, ``int(k/2 + ½)``.
    Odd ``k`` (half the draws) give one row more than any factor of the release can."""
    rng = np.random.default_rng(0)
    ks = rng.integers(1024, 4097, 2000)
    hafis_short = (1024 * ks / 2048 + 0.5).astype(int)
    # the factors that give width k are k / 2048 <= s < (k + 1) / 2048: all give the same height
    low, high = (np.array([int(1024 * s) for s in (ks + d) / 2048]) for d in (0.0, 1.0 - 1e-9))
    assert np.array_equal(low, high)
    assert np.array_equal(hafis_short - low, ks % 2)
    assert abs((ks % 2).mean() - 0.5) < 0.05


def test_augseg_padding_stays_bottom_right_after_a_flip():
    """A hand-made case of the flip before the crop: a 2 x 3 image padded to 4 x 4 and flipped keeps its padding
    on the right, as the release's ``RandomFlip`` before ``Crop`` does (flipping the crop would move it left)."""
    image = np.zeros((2, 3, 3), np.uint8)
    image[:, 0] = 9
    mask = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    source = OneImage(image, mask)
    ds = LabelledDataset(source, 4, (1.0, 1.0), SEED, geometry=AugSeg.traits.geometry)
    flips = set()
    for epoch in range(8):
        flip = replay_geometry(sample_rng(SEED, LABELLED_STREAM, epoch, 0), 2, 3, 4, scale=(1.0, 1.0))[3]
        out = ds[(epoch, 0)]
        assert out["mask"][0].tolist() == ([3, 2, 1, 255] if flip else [1, 2, 3, 255])
        assert to_uint8(out["image"])[0, 3].tolist() == [123, 116, 103]
        flips.add(flip)
    assert flips == {False, True}
