"""Tests of the built-in synthetic scenes: determinism, mask / box consistency, the ignore band and the cache."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hafis.data.base import IGNORE_INDEX, Sample
from hafis.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    SyntheticScenes,
    boundary_band,
    default_cache_dir,
    generate_scene,
    layers_to_sample,
    render_scene,
    sample_rng,
)

TINY = SyntheticConfig(image_size=48, num_labelled=12, num_unlabelled=4, num_val=6, seed=3)


def _all(source: SyntheticScenes) -> list[Sample]:
    return [source.load(i) for i in range(len(source))]


def _assert_same(a: Sample, b: Sample) -> None:
    assert a.id == b.id
    for name in ("image", "mask", "boxes", "box_labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs for {a.id}"


def test_same_seed_gives_identical_bytes_with_and_without_cache(tmp_path: Path) -> None:
    reference = _all(SyntheticScenes(TINY, "labelled", cache_dir=False))
    for samples in (
        _all(SyntheticScenes(TINY, "labelled", cache_dir=False)),
        _all(SyntheticScenes(TINY, "labelled", cache_dir=tmp_path / "a")),  # generated, then written
        _all(SyntheticScenes(TINY, "labelled", cache_dir=tmp_path / "a")),  # read back from the cache
    ):
        for a, b in zip(reference, samples, strict=True):
            _assert_same(a, b)


def test_different_seed_gives_different_images() -> None:
    a = SyntheticScenes(TINY, "labelled", cache_dir=False)
    b = SyntheticScenes(replace(TINY, seed=TINY.seed + 1), "labelled", cache_dir=False)
    for i in range(3):
        assert not np.array_equal(a.load(i).image, b.load(i).image)


def test_sample_does_not_depend_on_split_size() -> None:
    small = SyntheticScenes(replace(TINY, num_labelled=5), "labelled", cache_dir=False)
    large = SyntheticScenes(replace(TINY, num_labelled=10), "labelled", cache_dir=False)
    assert (len(small), len(large)) == (5, 10)
    for i in range(5):
        _assert_same(small.load(i), large.load(i))
    # and it is exactly generate_scene on the documented per-sample generator
    direct = generate_scene(sample_rng(TINY.seed, "labelled", 4), **TINY.scene_kwargs())
    assert direct.image.tobytes() == small.load(4).image.tobytes()
    assert direct.mask.tobytes() == small.load(4).mask.tobytes()


def test_splits_differ_and_unlabelled_keeps_its_mask() -> None:
    firsts = [SyntheticScenes(TINY, split, cache_dir=False).load(0) for split in ("labelled", "unlabelled", "val")]
    assert [s.id for s in firsts] == ["labelled_000000", "unlabelled_000000", "val_000000"]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(firsts[i].image, firsts[j].image)
    assert firsts[1].mask is not None and firsts[1].mask.shape == (48, 48)


def test_bad_split_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="'train'"):
        SyntheticScenes(TINY, "train", cache_dir=False)


def test_bad_config_is_rejected() -> None:
    for bad in ({"num_object_classes": 0}, {"num_object_classes": 6}, {"image_size": 8}, {"min_radius": 0.0}):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)


@pytest.mark.parametrize("num_classes", [5, 2])
def test_dtypes_shapes_and_value_ranges(num_classes: int) -> None:
    cfg = replace(TINY, num_object_classes=num_classes, num_labelled=20)
    source = SyntheticScenes(cfg, "labelled", cache_dir=False)
    assert tuple(source.class_names) == CLASS_NAMES[: num_classes + 1]
    assert tuple(source.thing_classes) == tuple(range(1, num_classes + 1))
    assert source.num_classes == num_classes + 1
    assert list(source.ids[:2]) == ["labelled_000000", "labelled_000001"]
    allowed = set(range(num_classes + 1)) | {IGNORE_INDEX}
    seen: set[int] = set()
    n_boxes = []
    for s in _all(source):
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (48, 48) and s.mask.dtype == np.uint8
        assert s.boxes.dtype == np.float32 and s.boxes.ndim == 2 and s.boxes.shape[1] == 4
        assert s.box_labels.dtype == np.int64 and s.box_labels.shape == (len(s.boxes),)
        assert set(np.unique(s.box_labels)) <= set(range(1, num_classes + 1))
        values = set(np.unique(s.mask).tolist())
        assert values <= allowed
        seen |= values
        n_boxes.append(len(s.boxes))
        assert s.image.std() > 5  # noise and texture, not a flat image
    assert {0, IGNORE_INDEX} <= seen and len(seen - {0, IGNORE_INDEX}) == num_classes  # every class occurs
    assert max(n_boxes) <= cfg.max_objects and np.mean(n_boxes) >= 1.5  # several objects per image


def _boxes_agree_with_mask(s: Sample) -> None:
    h, w = s.mask.shape
    covered = np.zeros((len(CLASS_NAMES), h, w), bool)
    for box, label in zip(s.boxes, s.box_labels, strict=True):
        assert np.array_equal(box, np.round(box)), "boxes lie on the pixel grid"
        x0, y0, x1, y1 = box.astype(int)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"box {box} outside the {w}x{h} image or empty"
        inside = s.mask[y0:y1, x0:x1] == label
        # tight: the box's first / last row and column each hold a pixel of its class
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), (s.id, box)
        covered[label, y0:y1, x0:x1] = True
    for cls in range(1, len(CLASS_NAMES)):
        uncovered = (s.mask == cls) & ~covered[cls]
        assert not uncovered.any(), f"{s.id}: {uncovered.sum()} pixels of class {cls} not in a box of that class"


def test_boxes_are_tight_and_cover_every_object_pixel() -> None:
    source = SyntheticScenes(replace(TINY, num_labelled=40), "labelled", cache_dir=False)
    samples = _all(source)
    for s in samples:
        _boxes_agree_with_mask(s)
    assert sum(len(s.boxes) for s in samples) >= 60


def test_ignore_band_lies_exactly_on_object_boundaries() -> None:
    """255 marks the pixels next to another instance (and objects too small to label), nothing else."""
    kwargs = TINY.scene_kwargs()
    min_area = kwargs.pop("min_visible_area")
    kwargs.pop("image_size"), kwargs.pop("num_object_classes")
    total_ignore = total = 0
    for i in range(30):
        layers = render_scene(sample_rng(TINY.seed, "labelled", i), TINY.image_size, TINY.num_object_classes, **kwargs)
        sample = layers_to_sample(layers, f"s{i}", min_area)
        inst, mask = layers.instances, sample.mask
        band = boundary_band(inst)
        # the band really is "has a 4-neighbour of another instance" (recomputed independently on a padded map),
        # so it is 2 px wide: 1 px on each side of a boundary
        padded = np.pad(inst.astype(int), 1, constant_values=-1)
        centre = padded[1:-1, 1:-1]
        differs = np.zeros_like(band)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            nb = padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
            differs |= (nb != centre) & (nb != -1)
        assert np.array_equal(band, differs)
        # every boundary pixel is ignored; an ignored pixel off the band belongs to an object dropped as too small
        assert (mask[band] == IGNORE_INDEX).all()
        area = np.bincount(np.where(band, 0, inst).ravel(), minlength=inst.max() + 1)
        dropped = np.isin(inst, [k for k in range(1, len(area)) if area[k] < min_area])
        off_band = (mask == IGNORE_INDEX) & ~band
        assert not (off_band & ~dropped).any()
        # every other pixel carries the class of its visible instance
        lut = np.concatenate([[0], layers.instance_classes])
        keep = mask != IGNORE_INDEX
        assert np.array_equal(mask[keep], lut[inst][keep])
        total_ignore += int((mask == IGNORE_INDEX).sum())
        total += mask.size
    assert 0.01 < total_ignore / total < 0.25


def test_cache_is_one_file_read_back_and_regenerated_when_truncated(tmp_path: Path, monkeypatch) -> None:
    first = SyntheticScenes(TINY, "val", cache_dir=tmp_path)
    original = _all(first)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".npz"], files  # one file, no temp file left behind
    path = files[0]
    assert path == first.cache_path and "val" in path.name

    def no_generation(self):
        raise AssertionError("should have read the cache")

    second = SyntheticScenes(TINY, "val", cache_dir=tmp_path)
    with monkeypatch.context() as m:
        m.setattr(SyntheticScenes, "generate_arrays", no_generation)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for a, b in zip(original, _all(second), strict=True):
                _assert_same(a, b)

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    third = SyntheticScenes(TINY, "val", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        regenerated = _all(third)
    for a, b in zip(original, regenerated, strict=True):
        _assert_same(a, b)
    assert path.read_bytes() == data  # rewritten whole
    assert sorted(tmp_path.iterdir()) == [path]


def test_cache_rejects_a_file_with_the_wrong_shapes(tmp_path: Path) -> None:
    source = SyntheticScenes(TINY, "val", cache_dir=tmp_path)
    original = source.load(2)
    arrays = source.generate_arrays()
    arrays["masks"] = arrays["masks"][:, :-1]
    with open(source.cache_path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(UserWarning, match=re.escape(source.cache_path.name)):
        _assert_same(SyntheticScenes(TINY, "val", cache_dir=tmp_path).load(2), original)


def test_cache_name_depends_on_config_and_split(tmp_path: Path) -> None:
    names = {
        SyntheticScenes(TINY, "val", cache_dir=tmp_path).cache_path.name,
        SyntheticScenes(TINY, "labelled", cache_dir=tmp_path).cache_path.name,
        SyntheticScenes(replace(TINY, noise_std=3.0), "val", cache_dir=tmp_path).cache_path.name,
        SyntheticScenes(replace(TINY, num_val=7), "val", cache_dir=tmp_path).cache_path.name,
    }
    assert len(names) == 4
    # the size of another split does not change this split's data, so it shares the file
    same = SyntheticScenes(replace(TINY, num_labelled=99), "val", cache_dir=tmp_path).cache_path.name
    assert same in names
    assert SyntheticScenes(TINY, "val", cache_dir=False).cache_path is None


def test_default_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HAFIS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "synthetic"
    source = SyntheticScenes(replace(TINY, num_val=2), "val")  # cache_dir=None -> default
    source.load(0)
    assert source.cache_path.parent == tmp_path / "c" / "synthetic" and source.cache_path.is_file()
    monkeypatch.delenv("HAFIS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "hafis" / "synthetic"


def test_load_returns_copies_and_checks_the_index() -> None:
    source = SyntheticScenes(replace(TINY, num_val=3), "val", cache_dir=False)
    s = source.load(1)
    before = s.mask.copy()
    s.mask[:] = 7
    s.image[:] = 0
    assert np.array_equal(source.load(1).mask, before)
    assert source.load(-1).id == "val_000002"
    with pytest.raises(IndexError):
        source.load(3)
