"""ADE20K (the SceneParsing benchmark, ``ADEChallengeData2016``): 150 classes.

Tree (``data.root`` = the ``ADEChallengeData2016`` folder, as the official zip unpacks)::

    images/training/ADE_train_<8 digits>.jpg          the 20,210 training images
    annotations/training/ADE_train_<8 digits>.png     8-bit grey: 0 = other / unlabelled, 1-150 = the classes
    images/validation/ADE_val_<8 digits>.jpg          the 2,000 validation images
    annotations/validation/ADE_val_<8 digits>.png

An id is the file stem (``ADE_train_00000001``); split files may hold ids or the paths the published lists use
(``images/training/ADE_train_00000001.jpg annotations/training/ADE_train_00000001.png``). Labels are read as
UniMatch V2 trains on them and mmsegmentation reads ADE20K (``reduce_zero_label``): 0 becomes 255 (ignore) and
class k becomes k - 1, so ids 0-149 are :data:`CLASS_NAMES` (wall ... flag). UniMatch V2 distributes its annotations
already converted; hafis reads the dataset's own, and a value above 150 (a 255 there means converted labels) is an
error naming the file, never shifted a second time. No instance annotations: the detector's boxes are the connected
components of the thing classes (:data:`THING_CLASSES`, ADE20K-Panoptic's 100 things).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError
from .io import Problem, read_label
from .layout import DatasetLayout

#: the 150 classes in label order (UniMatch V2 util/classes.py, mmsegmentation ADE20KDataset; theirs spell the
#: eighth 'bed ' with a space)
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
#: the classes ADE20K-Panoptic counts as things (``isthing`` of Mask2Former's ADE20K_150_CATEGORIES), in label ids
THING_CLASSES = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47, 49,
    50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89,
    90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125, 126,
    127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)
#: the largest value of an annotation as the dataset ships it
MAX_RAW = len(CLASS_NAMES)
#: annotation value -> label: 0 -> 255, k -> k - 1 (values above 150 never reach it: they are refused)
_LUT = np.full(256, 255, np.uint8)
_LUT[1:MAX_RAW + 1] = np.arange(MAX_RAW, dtype=np.uint8)

_FOLDERS = {"train": "training", "val": "validation"}


def annotation_to_labels(raw: np.ndarray) -> np.ndarray:
    """An ``annotations/*.png`` array (0-150) as labels: 0 -> 255 (ignore), k -> k - 1."""
    return _LUT[raw]


class ADE20K(DatasetLayout):
    name = "ade20k"
    class_names = CLASS_NAMES
    thing_classes = THING_CLASSES

    def __init__(self, root) -> None:
        super().__init__(root)
        self.images = self.root / "images"
        self.annotations = self.root / "annotations"

    @staticmethod
    def _split(part: str) -> str:
        return _FOLDERS["val" if part == "val" else "train"]

    def _scan(self, split: str) -> list[str]:
        folder = self.images / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing (images/{split}/*.jpg of ADEChallengeData2016)")
        return sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".jpg"))

    def train_pool(self) -> list[str]:
        return self._scan(_FOLDERS["train"])

    def labelled_pool(self) -> list[str]:
        folder = self.annotations / _FOLDERS["train"]
        have = {name[:-4] for name in os.listdir(folder) if name.endswith(".png")} if folder.is_dir() else set()
        return [i for i in self.train_pool() if i in have]

    def val_ids(self) -> list[str]:
        return self._scan(_FOLDERS["val"])

    # ---- files
    def image_path(self, id: str, part: str) -> Path:
        return self.images / self._split(part) / f"{id}.jpg"

    def expected_mask_path(self, id: str, part: str) -> Path:
        return self.annotations / self._split(part) / f"{id}.png"

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        p = self.expected_mask_path(id, part)
        return p if p.is_file() else None

    @staticmethod
    def _bad_values(raw: np.ndarray) -> list[int]:
        return [int(v) for v in np.unique(raw[raw > MAX_RAW])]

    @staticmethod
    def _bad_message(bad: list[int]) -> str:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        return (f"annotation value(s) {shown} outside ADE20K's 0..{MAX_RAW} (0 = other); "
                f"already converted labels (255 = ignore)? hafis reads ADEChallengeData2016's own annotations")

    def read_mask(self, path: Path) -> np.ndarray:
        raw = read_label(path)
        if raw.max(initial=0) > MAX_RAW:
            raise DataError(f"{path}: {self._bad_message(self._bad_values(raw))}")
        return annotation_to_labels(raw)

    def check_mask(self, path: Path, size) -> list[Problem]:
        try:
            raw = read_label(path)
        except Exception as exc:
            return [Problem(str(path), f"unreadable mask ({type(exc).__name__}: {exc})")]
        problems = []
        if size is not None and raw.shape != tuple(size):
            problems.append(Problem(str(path), f"mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is "
                                               f"{size[1]}x{size[0]}"))
        bad = self._bad_values(raw)
        if bad:
            problems.append(Problem(str(path), self._bad_message(bad)))
        return problems


__all__ = ["ADE20K", "CLASS_NAMES", "THING_CLASSES", "annotation_to_labels"]
