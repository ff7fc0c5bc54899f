"""Pascal VOC 2012 (21 classes incl. background), classic and blended (SBD-augmented) settings.

Tree (``data.root`` = the ``VOC2012`` folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png       palette PNG, indices 0-20, 255 = border / ignore (the 1,464 + 1,449 fine masks)
    SegmentationClassAug/<id>.png    SBD-augmented masks, 8-bit grey 0-20 / 255 (10,582 train + val); optional
    SegmentationObject/<id>.png      palette PNG of instance ids (boxes); optional
    Annotations/<id>.xml             VOC boxes (used for boxes when SegmentationObject has no file); optional
    ImageSets/Segmentation/{train,val}.txt          the official lists (1,464 / 1,449 ids)
    ImageSets/Segmentation/train_aug.txt            optional list of the 10,582 (else: SegmentationClassAug minus val)

Settings (``data.voc_setting``):

- ``classic``: labelled ids come from the 1,464 fine ``train`` images (92 / 183 / 366 / 732 / 1464); their masks are
  read from ``SegmentationClass`` (falling back to ``SegmentationClassAug``, which holds the same masks for them).
  Unlabelled = the rest of the 10,582.
- ``blended``: labelled ids come from all 10,582 (1/16, 1/8, 1/4), masks from ``SegmentationClassAug`` first.

UniMatch ships its ``SegmentationClass`` folder already replaced by the augmented masks; that works as is.
Validation is always the 1,449 ``val`` images with their fine masks, evaluated whole-image.
Boxes: from ``SegmentationObject`` (each instance's class = the majority class of its pixels), else from
``Annotations/*.xml`` (1-based inclusive VOC coordinates converted to 0-based exclusive), else one box per
connected region of each class of the mask.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np

from .base import IGNORE_INDEX
from .io import (
    boxes_from_connected_components,
    boxes_from_instance_mask,
    empty_boxes,
    find_image,
    read_instance_ids,
    stack_boxes,
)
from .layout import DatasetLayout

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SETTINGS = ("classic", "blended")


def voc_palette(n: int = 256) -> list[int]:
    """The standard VOC colour map (bit-interleaved), flat ``[r0, g0, b0, r1, ...]`` for ``Image.putpalette``."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_id_list(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class PascalVOC(DatasetLayout):
    name = "voc"
    class_names = CLASS_NAMES
    thing_classes = tuple(range(1, 21))

    def __init__(self, root, setting: str = "classic") -> None:
        super().__init__(root)
        if setting not in SETTINGS:
            raise ValueError(f"VOC setting must be one of {SETTINGS}, got {setting!r}")
        self.setting = setting
        self.images = self.root / "JPEGImages"
        self.fine = self.root / "SegmentationClass"
        self.aug = self.root / "SegmentationClassAug"
        self.lists = self.root / "ImageSets" / "Segmentation"

    # ---- ids
    def split_subdir(self) -> str:
        return self.setting

    def _list(self, name: str) -> Optional[list[str]]:
        path = self.lists / name
        return read_id_list(path) if path.is_file() else None

    def val_ids(self) -> list[str]:
        ids = self._list("val.txt")
        if ids is None:
            raise FileNotFoundError(f"{self.lists / 'val.txt'} is missing: the 1,449 validation ids")
        return ids

    def _fine_train(self) -> list[str]:
        ids = self._list("train.txt")
        if ids is None:
            raise FileNotFoundError(f"{self.lists / 'train.txt'} is missing: the 1,464 fine training ids")
        return ids

    def _aug_train(self) -> list[str]:
        for name in ("train_aug.txt", "trainaug.txt"):
            ids = self._list(name)
            if ids is not None:
                return ids
        if self.aug.is_dir():
            val = set(self.val_ids())
            return sorted(p.stem for p in self.aug.glob("*.png") if p.stem not in val)
        return []

    def labelled_pool(self) -> list[str]:
        if self.setting == "classic":
            return self._fine_train()
        ids = self._aug_train()
        if not ids:
            raise FileNotFoundError(f"the blended setting needs {self.aug} (SBD-augmented masks) or "
                                    f"{self.lists / 'train_aug.txt'}")
        return ids

    def train_pool(self) -> list[str]:
        pool = self._aug_train()
        seen = set(pool)
        extra = [i for i in self.labelled_pool() if i not in seen] if self.setting == "classic" else []
        return sorted(pool + extra)

    # ---- files
    def image_path(self, id: str, part: str) -> Path:
        return find_image(self.images, id, (".jpg", ".jpeg", ".png")) or self.images / f"{id}.jpg"

    def _mask_dirs(self, part: str) -> tuple[Path, Path]:
        if part == "val" or (part == "labelled" and self.setting == "classic"):
            return self.fine, self.aug
        return self.aug, self.fine

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        for folder in self._mask_dirs(part):
            p = folder / f"{id}.png"
            if p.is_file():
                return p
        return None

    def expected_mask_path(self, id: str, part: str) -> Path:
        return self._mask_dirs(part)[0] / f"{id}.png"

    # ---- boxes
    def boxes(self, id: str, part: str, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        obj = self.root / "SegmentationObject" / f"{id}.png"
        if mask is not None and obj.is_file():
            # an instance's class: the majority of its object pixels (background and borders do not vote)
            return boxes_from_instance_mask(read_instance_ids(obj), np.where(mask == 0, IGNORE_INDEX, mask))
        xml = self.root / "Annotations" / f"{id}.xml"
        if xml.is_file():
            return xml_boxes(xml)
        if mask is not None:
            return boxes_from_connected_components(mask, self.thing_classes)
        return empty_boxes()


def xml_boxes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a VOC ``Annotations`` XML: ``xmin..xmax`` are 1-based inclusive, so ``x0 = xmin - 1, x1 = xmax``."""
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    boxes, labels = [], []
    for obj in ET.parse(path).getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if name not in index or bb is None:
            continue
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0 - 1.0, y0 - 1.0, x1, y1))
        labels.append(index[name])
    return stack_boxes(boxes, labels)


__all__ = ["CLASS_NAMES", "PascalVOC", "SETTINGS", "voc_palette", "xml_boxes"]
