"""The weak geometry: labels stay on the pixels they label (measured offset), PIL's pixel-centre NEAREST exactly,
PIL's BILINEAR to two grey levels, and each release's draws (scale, padding side and colour, flip order)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hafis.data.transforms import (
    PIL_GEOMETRY,
    TENSOR_GEOMETRY,
    Geometry,
    GeometryDraw,
    apply_geometry,
    draw_geometry,
    resize_image,
    resize_nearest,
)

AUGSEG_GEOMETRY = Geometry(image_fill=(123, 116, 103))


def ramps(h, w):
    """An image whose channel 0 is its column index and channel 1 its row index, and the same two as label maps."""
    x = torch.arange(w, dtype=torch.uint8).expand(h, w)
    y = torch.arange(h, dtype=torch.uint8)[:, None].expand(h, w)
    return torch.stack([x, y, torch.zeros(h, w, dtype=torch.uint8)]), x.contiguous(), y.contiguous()


def label_offsets(geometry, trials=60, seed=0, resize_labels=None):
    """Mean (label − image) position over random scales in [0.5, 2], in output pixels, for x and y.

    The image is resized bilinearly (its value at an output pixel is the source position its centre maps to), the
    label maps by nearest: a label map that sits on its image gives a mean difference of 0. ``resize_labels``
    replaces the geometry's label resize (no crop then)."""
    rng = np.random.default_rng(seed)
    offsets = {"x": [], "y": []}
    for _ in range(trials):
        h, w = (int(v) for v in rng.integers(60, 200, 2))
        image, mx, my = ramps(h, w)
        draw = draw_geometry(h, w, 96, (0.5, 2.0), geometry, rng)
        if resize_labels is None:
            out, (lx, ly) = apply_geometry(image, [(mx, 255), (my, 255)], draw, 96, geometry)
        else:
            out = resize_image(image, draw.size, geometry.antialias)
            lx, ly = (resize_labels(m, draw.size) for m in (mx, my))
        for axis, label, value, n, scale in (("x", lx, out[0], w, draw.size[1] / w),
                                             ("y", ly, out[1], h, draw.size[0] / h)):
            keep = (label != 255) & (label >= 3) & (label <= n - 4)  # inside the image, away from its border
            offsets[axis].append(((label[keep].double() - value[keep].double()).mean() * scale).item())
    return {k: float(np.mean(v)) for k, v in offsets.items()}


def torch_nearest(m, size):
    return F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].to(m.dtype)


@pytest.mark.parametrize("geometry", [PIL_GEOMETRY, TENSOR_GEOMETRY, AUGSEG_GEOMETRY],
                         ids=["unimatch", "u2pl-ael", "augseg"])
def test_labels_sit_on_their_pixels_over_random_scales(geometry):
    offsets = label_offsets(geometry)
    assert abs(offsets["x"]) < 0.05 and abs(offsets["y"]) < 0.05, offsets


def test_the_measure_sees_torch_nearest_half_a_pixel_off():
    """The same measure on torch's ``nearest`` (the old rule, U2PL's and AEL's): labels about half an output pixel
    up and left of their pixels."""
    offsets = label_offsets(PIL_GEOMETRY, trials=30, resize_labels=torch_nearest)
    assert -0.6 < offsets["x"] < -0.4 and -0.6 < offsets["y"] < -0.4, offsets


def test_nearest_resize_equals_pil_nearest_exactly():
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        oh, ow = (int(v) for v in rng.integers(1, 180, 2))
        m = rng.integers(0, 256, (h, w)).astype(np.uint8)
        expected = np.array(Image.fromarray(m).resize((ow, oh), Image.NEAREST))
        assert np.array_equal(resize_nearest(torch.from_numpy(m), (oh, ow)).numpy(), expected), (h, w, oh, ow)


def test_nearest_resize_of_a_hand_made_map():
    # 2 -> 7 columns: output centres at (j + 0.5) * 2 / 7 = 0.14, 0.43, 0.71, 1.0 (a tie: PIL's accumulated
    # float64 sum lands just below 1), 1.29, 1.57, 1.86
    m = torch.tensor([[10, 20]], dtype=torch.uint8)
    assert resize_nearest(m, (1, 7)).tolist() == [[10, 10, 10, 10, 20, 20, 20]]
    # 4 -> 2: centres 1.0 and 3.0: pixels 1 and 3 (torch's "nearest" takes 0 and 2)
    m = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert resize_nearest(m, (1, 2)).tolist() == [[2, 4]]
    assert torch_nearest(m, (1, 2)).tolist() == [[1, 3]]
    # leading dimensions (a per-class box mask) follow, bools too
    boxes = torch.zeros(3, 4, 4, dtype=torch.bool)
    boxes[1, 1:3, 1:3] = True
    assert resize_nearest(boxes, (8, 8))[1].nonzero().tolist() == [[y, x] for y in range(2, 6) for x in range(2, 6)]


def test_image_resize_follows_pil_bilinear_within_two_levels():
    rng = np.random.default_rng(2)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        s = rng.uniform(0.5, 2.0)
        oh, ow = max(1, int(h * s)), max(1, int(w * s))
        im = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        expected = np.array(Image.fromarray(im).resize((ow, oh), Image.BILINEAR)).astype(int)
        got = resize_image(torch.from_numpy(im).permute(2, 0, 1).contiguous(), (oh, ow)).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - expected).max() <= 2  # 1 at these sizes; 2 seen at VOC sizes


def test_shrinking_without_antialias_aliases():
    """A one-pixel checkerboard shrunk to a third: PIL's BILINEAR (and ``antialias``) averages it to grey; plain
    bilinear (the tensor releases) samples one source pixel per output pixel and keeps the black-and-white pattern."""
    board = ((torch.arange(30)[:, None] + torch.arange(30)) % 2 * 255).to(torch.uint8).expand(3, 30, 30)
    smooth = resize_image(board.contiguous(), (10, 10), antialias=True)
    sharp = resize_image(board.contiguous(), (10, 10), antialias=False)
    pil = np.array(Image.fromarray(board[0].numpy()).resize((10, 10), Image.BILINEAR)).astype(int)
    assert np.abs(smooth[0].numpy().astype(int) - pil).max() <= 1
    assert smooth.float().std() < 30 < sharp.float().std()


def test_long_side_draw_is_unimatchs():
    """UniMatch's ``resize``: the long side uniform in int(L·0.5) .. int(L·2.0), the short side int(s·long/L + 0.5)."""
    rng = np.random.default_rng(3)
    longs, sizes = [], set()
    for _ in range(3000):
        d = draw_geometry(375, 500, 64, (0.5, 2.0), PIL_GEOMETRY, rng)
        longs.append(d.size[1])
        assert d.size[0] == int(1.0 * 375 * d.size[1] / 500 + 0.5)
        sizes.add(d.size)
    assert min(longs) == 250 and max(longs) == 1000
    tall = draw_geometry(500, 375, 64, (1.0, 1.0), PIL_GEOMETRY, np.random.default_rng(0))
    assert tall.size == (500, 375)


def test_piecewise_draw_is_u2pls():
    """U2PL's ``RandResize``: half the factors in [0.5, 1), half in [1, 2): P(s < 1) = 1/2 (uniform would give 1/3)."""
    rng = np.random.default_rng(4)
    sizes = np.array([draw_geometry(100, 200, 64, (0.5, 2.0), TENSOR_GEOMETRY, rng).size for _ in range(4000)])
    assert sizes[:, 0].min() >= 50 and sizes[:, 0].max() < 200 and sizes[:, 1].max() < 400
    assert abs((sizes[:, 1] < 200).mean() - 0.5) < 0.03
    assert np.array_equal(sizes[:, 1] // 2, sizes[:, 0]) or np.abs(sizes[:, 1] - 2 * sizes[:, 0]).max() <= 1


def test_padding_side_colour_and_flip_order_by_hand():
    image = torch.full((3, 2, 3), 7, dtype=torch.uint8)
    image[:, :, 0] = 9  # a left column, to see the flips
    mask = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    draw = GeometryDraw(size=(2, 3), corner=(0, 0), flip=False)
    # UniMatch: padding bottom / right, image 0, mask 255
    out, (m,) = apply_geometry(image, [(mask, 255)], draw, 4, PIL_GEOMETRY)
    assert m.tolist() == [[1, 2, 3, 255], [4, 5, 6, 255], [255] * 4, [255] * 4]
    assert out[0].tolist() == [[9, 7, 7, 0], [9, 7, 7, 0], [0] * 4, [0] * 4]
    # AugSeg: the same with the mean colour
    out, _ = apply_geometry(image, [(mask, 255)], draw, 4, AUGSEG_GEOMETRY)
    assert out[:, 3, 3].tolist() == [123, 116, 103]
    # U2PL / AEL: centred (the odd pixel bottom / right), mean colour; crop 5 from (1, 0) of the 5x5 padded image
    out, (m,) = apply_geometry(image, [(mask, 255)], GeometryDraw((2, 3), (0, 0), False), 5, TENSOR_GEOMETRY)
    assert m.tolist() == [[255] * 5, [255, 1, 2, 3, 255], [255, 4, 5, 6, 255], [255] * 5, [255] * 5]
    assert out[:, 0, 0].tolist() == [124, 116, 104]
    # flip after the crop (UniMatch) vs before the padding (U2PL / AEL): the padding ends up left vs stays right
    flipped = GeometryDraw((2, 3), (0, 0), True)
    _, (m,) = apply_geometry(image, [(mask, 255)], flipped, 4, PIL_GEOMETRY)
    assert m[0].tolist() == [255, 3, 2, 1]
    _, (m,) = apply_geometry(image, [(mask, 255)], flipped, 4, Geometry(flip="before_pad"))
    assert m[0].tolist() == [3, 2, 1, 255]


def test_a_geometry_names_its_bad_value():
    with pytest.raises(ValueError, match="Geometry.pad"):
        Geometry(pad="left")
    with pytest.raises(ValueError, match="Geometry.scale"):
        Geometry(scale="uniform")
