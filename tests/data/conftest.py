"""Hand-written mini trees in exactly the official on-disk formats (VOC, Cityscapes, COCO, ADE20K, the folder
format).

Every mask is built from a few rectangles whose pixel counts the tests know exactly; images are noise (JPEG where
the dataset uses JPEG, PNG where it uses PNG). The builders are fixtures returning functions, so a test can build a
tree, then break it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafis.data.coco import COCO_CATEGORIES
from hafis.data.voc import voc_palette


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(h, w, seed)).save(path, quality=90)


def save_png_rgb(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(h, w, seed)).save(path)


def save_palette(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = mask.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path)


def save_grey(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)


def save_16bit(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)


# ----------------------------------------------------------------------------------------------------------- VOC
VOC_H, VOC_W = 32, 40
VOC_FINE_TRAIN = ("2007_000032", "2007_000039", "2007_000063")
VOC_AUG_ONLY = ("2008_000008", "2008_000015", "2008_000019", "2008_000023")
VOC_VAL = ("2007_000033", "2007_000042")


def voc_fine_mask() -> np.ndarray:
    """person (15) 8x10 = 80 px, car (7) 8x12 = 96 px, a 12 px ignore line above the person."""
    m = np.zeros((VOC_H, VOC_W), np.uint8)
    m[4:12, 5:15] = 15
    m[16:24, 20:32] = 7
    m[3, 4:16] = 255
    return m


def voc_object_mask() -> np.ndarray:
    m = np.zeros((VOC_H, VOC_W), np.uint8)
    m[4:12, 5:15] = 1
    m[16:24, 20:32] = 2
    m[3, 4:16] = 255
    return m


def voc_aug_mask() -> np.ndarray:
    """dog (12) 10x10 = 100 px."""
    m = np.zeros((VOC_H, VOC_W), np.uint8)
    m[10:20, 10:20] = 12
    return m


VOC_XML = """<annotation><filename>{id}.jpg</filename><size><width>40</width><height>32</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>
</annotation>"""


def build_voc(root: Path) -> Path:
    root = root / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(VOC_FINE_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    for k, id in enumerate(VOC_FINE_TRAIN + VOC_VAL):
        h, w = (VOC_H, VOC_W) if id != VOC_VAL[1] else (VOC_H - 2, VOC_W - 4)
        save_jpeg(root / "JPEGImages" / f"{id}.jpg", h, w, seed=k)
        mask = voc_fine_mask()[:h, :w]
        save_palette(root / "SegmentationClass" / f"{id}.png", mask)
        save_grey(root / "SegmentationClassAug" / f"{id}.png", mask)
        save_palette(root / "SegmentationObject" / f"{id}.png", voc_object_mask()[:h, :w])
    for k, id in enumerate(VOC_AUG_ONLY):
        save_jpeg(root / "JPEGImages" / f"{id}.jpg", VOC_H, VOC_W, seed=100 + k)
        save_grey(root / "SegmentationClassAug" / f"{id}.png", voc_aug_mask())
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{id}.xml").write_text(VOC_XML.format(id=id))
    return root


# ---------------------------------------------------------------------------------------------------- Cityscapes
CS_H, CS_W = 32, 64
CS_TRAIN = ("aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313")
CS_TRAIN_NO_GT = ("bremen/bremen_000000_000019",)
CS_VAL = ("frankfurt/frankfurt_000000_000294",)


def cs_label_ids() -> np.ndarray:
    """road (7 -> 0) top half, sky (23 -> 10) bottom-left, a car group (26), an ego-vehicle strip (1 -> 255)."""
    m = np.full((CS_H, CS_W), 7, np.uint8)
    m[16:, :32] = 23
    m[20:28, 40:50] = 26
    m[20:28, 52:60] = 26
    m[30:, 32:] = 1
    m[2:6, 2:6] = 24
    return m


def cs_instance_ids() -> np.ndarray:
    inst = cs_label_ids().astype(np.int32)
    inst[20:28, 40:50] = 26000
    inst[20:28, 52:60] = 26001
    inst[2:6, 2:6] = 24000
    return inst


def build_cityscapes(root: Path) -> Path:
    root = root / "cityscapes"
    from hafis.data.cityscapes import label_ids_to_train_ids

    for k, id in enumerate(CS_TRAIN + CS_TRAIN_NO_GT + CS_VAL):
        split = "val" if id in CS_VAL else "train"
        save_png_rgb(root / "leftImg8bit" / split / f"{id}_leftImg8bit.png", CS_H, CS_W, seed=k)
        if id in CS_TRAIN_NO_GT:
            continue
        gt = root / "gtFine" / split
        save_grey(gt / f"{id}_gtFine_labelIds.png", cs_label_ids())
        save_16bit(gt / f"{id}_gtFine_instanceIds.png", cs_instance_ids())
        if id != CS_TRAIN[2]:  # the third training image has only labelIds: the reader converts it
            save_grey(gt / f"{id}_gtFine_labelTrainIds.png", label_ids_to_train_ids(cs_label_ids()))
    return root


# ---------------------------------------------------------------------------------------------------------- COCO
COCO_TRAIN = {1: (30, 40), 2: (30, 40), 3: (24, 32), 4: (24, 32)}
COCO_VAL = {101: (30, 40), 102: (24, 36)}
LABEL_OF = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}


def coco_rle_counts(region: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = region.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def coco_image1_annotations(image_id: int = 1) -> list[dict]:
    """car polygon 18x10, a person polygon 6x4 inside it listed *before* it (smaller wins), a dog as uncompressed
    RLE, a crowd region as compressed RLE."""
    from pycocotools import mask as mask_utils

    h, w = COCO_TRAIN[1]
    dog = np.zeros((h, w), np.uint8)
    dog[20:26, 25:35] = 1
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:4, 30:40] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    return [
        {"id": 11, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 24.0, "bbox": [10, 5, 6, 4],
         "segmentation": [[10, 5, 16, 5, 16, 9, 10, 9]]},
        {"id": 12, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": 180.0, "bbox": [2, 2, 18, 10],
         "segmentation": [[2, 2, 20, 2, 20, 12, 2, 12]]},
        {"id": 13, "image_id": image_id, "category_id": 18, "iscrowd": 0, "area": 60.0, "bbox": [25, 20, 10, 6],
         "segmentation": {"size": [h, w], "counts": coco_rle_counts(dog)}},
        {"id": 14, "image_id": image_id, "category_id": 1, "iscrowd": 1, "area": 40.0, "bbox": [30, 0, 10, 4],
         "segmentation": {"size": [h, w], "counts": crowd_rle["counts"].decode()}},
    ]


def coco_image1_expected() -> np.ndarray:
    h, w = COCO_TRAIN[1]
    m = np.zeros((h, w), np.uint8)
    m[2:12, 2:20] = LABEL_OF[3]
    m[5:9, 10:16] = LABEL_OF[1]
    m[20:26, 25:35] = LABEL_OF[18]
    m[0:4, 30:40] = 255
    return m


def build_coco(root: Path) -> Path:
    root = root / "coco"
    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_CATEGORIES]
    for split, images in (("train2017", COCO_TRAIN), ("val2017", COCO_VAL)):
        records, anns = [], []
        for k, (image_id, (h, w)) in enumerate(images.items()):
            name = f"{image_id:012d}.jpg"
            save_jpeg(root / split / name, h, w, seed=image_id)
            records.append({"id": image_id, "file_name": name, "height": h, "width": w})
            if image_id == 1:
                anns += coco_image1_annotations()
            elif image_id != 4:  # image 4 has no annotation: all background
                anns.append({"id": 1000 + image_id, "image_id": image_id, "category_id": 90, "iscrowd": 0,
                             "area": 16.0, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": records, "annotations": anns, "categories": categories}))
    return root


# -------------------------------------------------------------------------------------------------------- ADE20K
ADE_H, ADE_W = 12, 16
ADE_TRAIN = ("ADE_train_00000001", "ADE_train_00000002")
ADE_TRAIN_NO_GT = ("ADE_train_00000003",)
ADE_VAL = ("ADE_val_00000001",)


def ade_annotation() -> np.ndarray:
    """As the dataset ships it: 0 = other; 1 = wall (left top), 13 = person (left bottom), 150 = flag (right), with a
    2x2 'other' hole in the flag and a 1-pixel 2 (building) at its corner."""
    m = np.zeros((ADE_H, ADE_W), np.uint8)
    m[0:6, 0:8] = 1
    m[6:12, 0:8] = 13
    m[:, 8:16] = 150
    m[4:6, 10:12] = 0
    m[0, 15] = 2
    return m


def ade_labels() -> np.ndarray:
    """:func:`ade_annotation` as labels, written out by hand: other -> 255, wall 0, person 12, flag 149, building 1."""
    m = np.full((ADE_H, ADE_W), 255, np.uint8)
    m[0:6, 0:8] = 0
    m[6:12, 0:8] = 12
    m[:, 8:16] = 149
    m[4:6, 10:12] = 255
    m[0, 15] = 1
    return m


def build_ade20k(root: Path) -> Path:
    root = root / "ADEChallengeData2016"
    for k, id in enumerate(ADE_TRAIN + ADE_TRAIN_NO_GT + ADE_VAL):
        split = "validation" if id in ADE_VAL else "training"
        save_jpeg(root / "images" / split / f"{id}.jpg", ADE_H, ADE_W, seed=200 + k)
        if id not in ADE_TRAIN_NO_GT:
            save_grey(root / "annotations" / split / f"{id}.png", ade_annotation())
    return root


# -------------------------------------------------------------------------------------------------------- folder
FOLDER_CLASSES = ("background", "leaf", "stem")


def folder_mask(h: int = 24, w: int = 24) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[2:10, 2:10] = 1  # 64 px
    m[14:20, 4:8] = 2  # 24 px
    m[14:20, 14:18] = 2  # another 24 px, a second region
    m[0, :] = 255
    return m


def build_folder(root: Path) -> Path:
    root = root / "plants"
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("# my classes\n" + "\n".join(FOLDER_CLASSES) + "\n")
    for k, name in enumerate(("train/a", "train/b", "train/sub/c", "train/nomask", "val/v1", "val/v2")):
        h, w = (24, 24) if name != "val/v2" else (20, 28)
        if name.endswith("b"):
            save_jpeg(root / "images" / f"{name}.jpg", h, w, seed=k)
        else:
            save_png_rgb(root / "images" / f"{name}.png", h, w, seed=k)
        if name != "train/nomask":
            save_palette(root / "masks" / f"{name}.png", folder_mask(h, w))
    save_jpeg(root / "images" / "unlabelled" / "u1.jpg", 24, 24, seed=50)
    save_jpeg(root / "images" / "unlabelled" / "u2.jpg", 30, 26, seed=51)
    return root


@pytest.fixture
def voc_tree(tmp_path):
    return build_voc(tmp_path)


@pytest.fixture
def cityscapes_tree(tmp_path):
    return build_cityscapes(tmp_path)


@pytest.fixture
def coco_tree(tmp_path):
    return build_coco(tmp_path)


@pytest.fixture
def ade20k_tree(tmp_path):
    return build_ade20k(tmp_path)


@pytest.fixture
def folder_tree(tmp_path):
    return build_folder(tmp_path)


@pytest.fixture
def mini():
    """This module: the builders and the constants the tests check against."""
    return sys.modules[__name__]
