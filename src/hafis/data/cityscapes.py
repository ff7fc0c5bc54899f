"""Cityscapes (19 evaluation classes, the standard ``trainId`` set).

Tree (``data.root`` holds both folders)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png    trainIds 0-18, 255 = ignore
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png         the 34 label ids (used when no
                                                                               labelTrainIds file exists)
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png      16-bit: labelId * 1000 + k

An id is ``<city>/<city>_<seq>_<frame>`` (e.g. ``aachen/aachen_000000_000019``); split files may hold these or the
paths the published lists use (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/...``).
``*_labelIds.png`` is converted with the id -> trainId table of ``cityscapesscripts`` (:data:`LABEL_TO_TRAIN`), so
running ``createTrainIdLabelImgs`` first is not needed. Boxes come from ``*_instanceIds.png``: every instance
(value >= 1000) of a class with a trainId gets its tight box; groups without instances (``car group``) get none.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from .io import Problem, boxes_from_instance_mask, empty_boxes, read_instance_ids, read_label
from .layout import DatasetLayout

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: the RGB colour of each trainId (cityscapesscripts/helpers/labels.py), for predicted masks
TRAIN_ID_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
#: trainIds of the classes with instances (person ... bicycle): the detector's classes.
THING_CLASSES = tuple(range(11, 19))

#: labelId -> trainId (cityscapesscripts/helpers/labels.py); every other label id is ignored (255).
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
#: the label ids that exist (0 'unlabeled' ... 33 'bicycle'); a labelIds PNG with any other value is broken
NUM_LABEL_IDS = 34
_LUT = np.full(256, 255, np.uint8)
for _label, _train in LABEL_TO_TRAIN.items():
    _LUT[_label] = _train

_ID_RE = re.compile(r"([^/\\\s]+?)_(\d{6})_(\d{6})")


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Convert a ``*_labelIds.png`` array to trainIds (0-18, 255 = ignore)."""
    return _LUT[label_ids.astype(np.uint8)]


class Cityscapes(DatasetLayout):
    name = "cityscapes"
    class_names = CLASS_NAMES
    thing_classes = THING_CLASSES

    def __init__(self, root) -> None:
        super().__init__(root)
        self.images = self.root / "leftImg8bit"
        self.labels = self.root / "gtFine"

    @staticmethod
    def _split(part: str) -> str:
        return "val" if part == "val" else "train"

    def normalize_id(self, token: str) -> str:
        m = _ID_RE.search(Path(token).name)
        if m is None:
            raise ValueError(f"{token!r} is not a Cityscapes image id (<city>_<seq>_<frame>)")
        return f"{m.group(1)}/{m.group(0)}"

    def _scan(self, split: str) -> list[str]:
        folder = self.images / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing (leftImg8bit/{split}/<city>/*_leftImg8bit.png)")
        return sorted(f"{p.parent.name}/{p.name[: -len('_leftImg8bit.png')]}"
                      for p in folder.glob("*/*_leftImg8bit.png"))

    def train_pool(self) -> list[str]:
        return self._scan("train")

    def labelled_pool(self) -> list[str]:
        return [i for i in self.train_pool() if self.mask_path(i, "labelled") is not None]

    def val_ids(self) -> list[str]:
        return self._scan("val")

    # ---- files
    def image_path(self, id: str, part: str) -> Path:
        return self.images / self._split(part) / f"{id}_leftImg8bit.png"

    def _gt(self, id: str, part: str, kind: str) -> Path:
        return self.labels / self._split(part) / f"{id}_gtFine_{kind}.png"

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        for kind in ("labelTrainIds", "labelIds"):
            p = self._gt(id, part, kind)
            if p.is_file():
                return p
        return None

    def expected_mask_path(self, id: str, part: str) -> Path:
        return self._gt(id, part, "labelTrainIds")

    def read_mask(self, path: Path) -> np.ndarray:
        mask = read_label(path)
        if path.name.endswith("_labelIds.png"):
            return label_ids_to_train_ids(mask)
        return mask

    def check_mask(self, path: Path, size) -> list[Problem]:
        problems = []
        if path.name.endswith("_labelIds.png"):
            try:
                raw = read_label(path)
            except Exception as exc:
                return [Problem(str(path), f"unreadable mask ({type(exc).__name__}: {exc})")]
            bad = sorted(int(v) for v in np.unique(raw) if v >= NUM_LABEL_IDS)
            if bad:
                problems.append(Problem(str(path), f"label id value(s) {', '.join(map(str, bad[:10]))} outside the "
                                                   f"Cityscapes label ids 0..{NUM_LABEL_IDS - 1}"))
        return problems + super().check_mask(path, size)

    def boxes(self, id: str, part: str, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        path = self._gt(id, part, "instanceIds")
        if not path.is_file():
            return empty_boxes()
        return instance_id_boxes(read_instance_ids(path))


def instance_id_boxes(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a Cityscapes ``*_instanceIds.png``: values >= 1000 are ``labelId * 1000 + k``; instances of a label
    without a train id give no box."""
    boxes, ids = boxes_from_instance_mask(np.where(instances >= 1000, instances, 0))
    train = np.array([LABEL_TO_TRAIN.get(int(v) // 1000, -1) for v in ids], np.int64).reshape(-1)
    keep = train >= 0
    return boxes[keep], train[keep]


__all__ = ["CLASS_NAMES", "Cityscapes", "LABEL_TO_TRAIN", "THING_CLASSES", "TRAIN_ID_COLOURS", "instance_id_boxes",
           "label_ids_to_train_ids"]
