"""Each reader on its hand-written mini tree: exact class pixel counts, ignore handling, boxes, split sizes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hafis.config import load_config
from hafis.data import build_sources
from hafis.data.cityscapes import LABEL_TO_TRAIN, Cityscapes, label_ids_to_train_ids
from hafis.data.coco import COCO, rasterise
from hafis.data.splits import read_split, split_ids
from hafis.data.voc import CLASS_NAMES as VOC_CLASSES
from hafis.data.voc import PascalVOC


def counts(mask: np.ndarray) -> dict[int, int]:
    values, n = np.unique(mask, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n, strict=True)}


def data_config(dataset, root, **kw):
    overrides = [f"data.dataset={dataset}", f"data.root={root}"] + [f"data.{k}={v}" for k, v in kw.items()]
    return load_config(None, overrides).data


# ------------------------------------------------------------------------------------------------------------ VOC
def test_voc_classic_reads_palette_indices_ignore_and_instance_boxes(voc_tree, mini):
    labelled, unlabelled, val = build_sources(data_config("voc", voc_tree))
    assert labelled.class_names == VOC_CLASSES and labelled.num_classes == 21
    assert list(labelled.ids) == list(mini.VOC_FINE_TRAIN)
    # unlabelled = the SBD-augmented training ids minus the labelled ones (no train_aug.txt: derived from the folder)
    assert sorted(unlabelled.ids) == sorted(mini.VOC_AUG_ONLY)
    assert list(val.ids) == list(mini.VOC_VAL)

    s = labelled.load(0)
    assert s.image.shape == (32, 40, 3) and s.image.dtype == np.uint8
    assert s.mask.dtype == np.uint8
    # palette indices, not colours: person 80 px, car 96 px, 12 px of 255 kept as ignore
    assert counts(s.mask) == {0: 1280 - 80 - 96 - 12, 7: 96, 15: 80, 255: 12}
    order = np.argsort(s.box_labels)
    np.testing.assert_array_equal(s.box_labels[order], [7, 15])
    np.testing.assert_array_equal(s.boxes[order], [[20, 16, 32, 24], [5, 4, 15, 12]])
    assert s.boxes.dtype == np.float32

    u = unlabelled.load(0)  # an SBD-only image: mask from SegmentationClassAug (grey), boxes from its XML
    assert counts(u.mask) == {0: 1280 - 100, 12: 100}
    np.testing.assert_array_equal(u.boxes, [[10, 10, 20, 20]])  # xmin 11 (1-based) -> 10; xmax 20 -> 20 exclusive
    np.testing.assert_array_equal(u.box_labels, [12])

    v = val.load(1)  # the smaller validation image
    assert v.image.shape == (30, 36, 3) and v.mask.shape == (30, 36)


def test_voc_blended_draws_labelled_from_the_augmented_set(voc_tree, mini):
    labelled, unlabelled, val = build_sources(data_config("voc", voc_tree, voc_setting="blended"))
    assert sorted(labelled.ids) == sorted(mini.VOC_FINE_TRAIN + mini.VOC_AUG_ONLY)
    assert len(unlabelled) == 0 and len(val) == 2
    aug = labelled.ids.index(mini.VOC_AUG_ONLY[0])
    assert counts(labelled.load(aug).mask) == {0: 1180, 12: 100}


def test_voc_published_split_lines_with_paths_are_read(voc_tree, mini):
    split = voc_tree / "splits" / "mine.txt"
    split.parent.mkdir()
    split.write_text(f"JPEGImages/{mini.VOC_FINE_TRAIN[1]}.jpg SegmentationClass/{mini.VOC_FINE_TRAIN[1]}.png\n\n"
                     f"# comment\n{mini.VOC_FINE_TRAIN[2]}\n")
    labelled, unlabelled, _ = build_sources(data_config("voc", voc_tree, labelled_split="splits/mine.txt"))
    assert list(labelled.ids) == list(mini.VOC_FINE_TRAIN[1:])
    # the unlabelled default is the rest of the training pool, including the fine image not chosen
    assert sorted(unlabelled.ids) == sorted(mini.VOC_AUG_ONLY + mini.VOC_FINE_TRAIN[:1])


def test_voc_missing_mask_is_an_error_naming_the_image(voc_tree, mini):
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_tree / folder / f"{mini.VOC_FINE_TRAIN[0]}.png").unlink()
    labelled, _, _ = build_sources(data_config("voc", voc_tree))
    with pytest.raises(FileNotFoundError, match=mini.VOC_FINE_TRAIN[0]):
        labelled.load(0)


# ----------------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_train_ids_label_ids_conversion_and_instance_boxes(cityscapes_tree, mini):
    layout = Cityscapes(cityscapes_tree)
    labelled, unlabelled, val = build_sources(data_config("cityscapes", cityscapes_tree))
    assert labelled.num_classes == 19 and labelled.class_names[13] == "car"
    assert list(labelled.ids) == list(mini.CS_TRAIN)
    assert list(unlabelled.ids) == list(mini.CS_TRAIN_NO_GT)
    assert list(val.ids) == list(mini.CS_VAL)
    assert unlabelled.load(0).mask is None

    # road: the top half minus the 4x4 person, plus rows 16-29 of the right half minus the two cars; sky: the
    # bottom-left quarter; ego vehicle (ignored): rows 30-31 of the right half; the car group has no instances
    expected = {0: 16 * 64 - 16 + (14 * 32 - 80 - 64), 10: 16 * 32, 13: 80 + 64, 11: 16, 255: 2 * 32}
    got_train_ids = counts(labelled.load(0).mask)
    got_converted = counts(labelled.load(2).mask)  # only *_labelIds.png on disk
    assert got_converted == got_train_ids == expected

    s = labelled.load(0)
    order = np.argsort(s.boxes[:, 0])
    np.testing.assert_array_equal(s.boxes[order], [[2, 2, 6, 6], [40, 20, 50, 28], [52, 20, 60, 28]])
    np.testing.assert_array_equal(s.box_labels[order], [11, 13, 13])
    assert layout.normalize_id("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png") == mini.CS_TRAIN[0]


def test_cityscapes_label_table_matches_cityscapesscripts():
    assert len(LABEL_TO_TRAIN) == 19 and sorted(LABEL_TO_TRAIN.values()) == list(range(19))
    raw = np.arange(34, dtype=np.uint8)
    train = label_ids_to_train_ids(raw)
    assert train[7] == 0 and train[26] == 13 and train[33] == 18 and train[0] == 255 and train[29] == 255


# ----------------------------------------------------------------------------------------------------------- COCO
def test_coco_rasterises_polygons_and_rle_smaller_wins_crowd_ignored(coco_tree, mini, tmp_path):
    labelled, unlabelled, val = build_sources(data_config("coco", coco_tree, cache_dir=tmp_path / "cache"))
    assert labelled.num_classes == 81
    assert labelled.class_names[0] == "background" and labelled.class_names[80] == "toothbrush"
    assert list(labelled.ids) == [f"{i:012d}" for i in sorted(mini.COCO_TRAIN)]
    assert len(unlabelled) == 0 and len(val) == 2
    s = labelled.load(0)
    np.testing.assert_array_equal(s.mask, mini.coco_image1_expected())
    assert counts(s.mask) == {0: 1200 - 180 - 60 - 40, 1: 24, 3: 180 - 24, 17: 60, 255: 40}
    # boxes from the non-crowd bboxes, labels contiguous (dog: category 18 -> class 17; toothbrush: 90 -> 80)
    np.testing.assert_array_equal(s.boxes, [[10, 5, 16, 9], [2, 2, 20, 12], [25, 20, 35, 26]])
    np.testing.assert_array_equal(s.box_labels, [1, 3, 17])
    empty = labelled.load(3)
    assert counts(empty.mask) == {0: 24 * 32} and len(empty.boxes) == 0
    assert counts(labelled.load(1).mask) == {0: 1200 - 16, 80: 16}


def test_coco_cache_serves_masks_without_the_json(coco_tree, tmp_path):
    cache = tmp_path / "cache"
    labelled, _, _ = build_sources(data_config("coco", coco_tree, cache_dir=cache))
    first = labelled.load(0).mask
    assert len(list(cache.rglob("*.png"))) == 6  # build_sources rasterised the labelled and val masks
    fresh = COCO(coco_tree, cache_dir=cache)
    fresh._read_json = None  # a second run must not parse the JSON at all
    np.testing.assert_array_equal(fresh.load(f"{1:012d}", "labelled").mask, first)
    # unlabelled images read a cached mask when there is one, and have none otherwise
    assert fresh.load(f"{1:012d}", "unlabelled").mask is not None


def test_coco_rasterise_polygon_and_rle_against_hand_computed_masks():
    h, w = 6, 8
    poly = {"category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}
    rle = {"category_id": 2, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": [10, 3, 3, 3, 29]}}
    got = rasterise([poly, rle], h, w, {1: 1, 2: 2})
    expected = np.zeros((h, w), np.uint8)
    expected[1:4, 1:5] = 1  # polygon x 1..5, y 1..4 covers columns 1-4, rows 1-3
    # column-major runs: 10 zeros (column 0 and rows 0-3 of column 1), 3 ones (rows 4-5 of column 1, row 0 of
    # column 2), 3 zeros, 3 ones (rows 4-5 of column 2, row 0 of column 3), 29 zeros
    for y, x in ((4, 1), (5, 1), (0, 2), (4, 2), (5, 2), (0, 3)):
        expected[y, x] = 2
    np.testing.assert_array_equal(got, expected)
    # the RLE (6 px) is smaller than the polygon (12 px): it wins where they overlap, whatever the order
    overlap = {"category_id": 2, "iscrowd": 0, "segmentation": [[3, 2, 5, 2, 5, 3, 3, 3]]}
    np.testing.assert_array_equal(rasterise([overlap, poly], h, w, {1: 1, 2: 2})[2, 3:5], [2, 2])
    # equal areas: the later annotation wins
    a = {"category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}
    b = {"category_id": 2, "iscrowd": 0, "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}
    assert rasterise([a, b], h, w, {1: 1, 2: 2})[1, 1] == 2
    assert rasterise([b, a], h, w, {1: 1, 2: 2})[1, 1] == 1


def test_coco_without_pycocotools_is_a_data_error_naming_the_extra(monkeypatch):
    import sys

    from hafis.data.base import DataError

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import pycocotools now raises ImportError
    poly = {"category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}
    with pytest.raises(DataError, match=r"pip install 'hafis\[coco\]'"):
        rasterise([poly], 6, 8, {1: 1})


# --------------------------------------------------------------------------------------------------------- folder
def test_folder_format_with_unlabelled_images_without_masks(folder_tree, mini):
    labelled, unlabelled, val = build_sources(data_config("folder", folder_tree))
    assert labelled.class_names == mini.FOLDER_CLASSES
    assert labelled.thing_classes == (1, 2)
    assert list(labelled.ids) == ["train/a", "train/b", "train/sub/c"]
    assert list(unlabelled.ids) == ["train/nomask", "unlabelled/u1", "unlabelled/u2"]
    assert list(val.ids) == ["val/v1", "val/v2"]
    s = labelled.load(1)  # the JPEG one, palette mask
    assert counts(s.mask) == {0: 576 - 64 - 48 - 24, 1: 64, 2: 48, 255: 24}
    order = np.lexsort((s.boxes[:, 0], s.box_labels))
    np.testing.assert_array_equal(s.boxes[order], [[2, 2, 10, 10], [4, 14, 8, 20], [14, 14, 18, 20]])
    np.testing.assert_array_equal(s.box_labels[order], [1, 2, 2])
    assert all(unlabelled.load(i).mask is None for i in (1, 2))
    assert unlabelled.load(2).image.shape == (30, 26, 3)


def test_folder_rejects_colour_masks_with_a_clear_message(folder_tree):
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder_tree / "masks" / "train" / "a.png")
    labelled, _, _ = build_sources(data_config("folder", folder_tree))
    with pytest.raises(ValueError, match="single-channel"):
        labelled.load(0)


def test_split_ids_defaults_and_files(voc_tree, mini):
    layout = PascalVOC(voc_tree)
    (voc_tree / "u.txt").write_text(mini.VOC_AUG_ONLY[0] + "\n")
    lab, unl, val = split_ids(layout, None, "u.txt", None)
    assert lab == list(mini.VOC_FINE_TRAIN) and unl == [mini.VOC_AUG_ONLY[0]] and val == list(mini.VOC_VAL)
    assert read_split(voc_tree / "u.txt") == [mini.VOC_AUG_ONLY[0]]


def test_a_split_naming_missing_images_fails_before_training(voc_tree, mini):
    (voc_tree / "bad.txt").write_text(f"{mini.VOC_FINE_TRAIN[0]}\n2012_999999\n")
    with pytest.raises(FileNotFoundError, match=r"1 labelled image\(s\) of the split are missing, e.g. .*2012_999999"):
        build_sources(data_config("voc", voc_tree, labelled_split="bad.txt"))
