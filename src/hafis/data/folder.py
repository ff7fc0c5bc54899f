"""A user's own dataset: a folder of images, a folder of masks and a class list.

Format (``data.dataset: folder``, ``data.root`` = ``ROOT``)::

    ROOT/classes.txt                 one class name a line; line i (from 0) is class id i ('#' lines and blank
                                     lines are skipped). Put your background class first if you have one.
    ROOT/images/train/<name>.jpg     training images (.jpg .jpeg .png .bmp .tif .tiff .webp), sub-folders allowed
    ROOT/masks/train/<name>.png      the mask of a *labelled* training image; a training image without a mask is
                                     used as unlabelled only
    ROOT/images/val/<name>.jpg       validation images ...
    ROOT/masks/val/<name>.png        ... each with its mask
    ROOT/images/unlabelled/<name>    optional: images that have no masks at all (no masks/ folder needed)

A mask is a single-channel PNG (8-bit grey or palette) of class ids, the same size as its image; 255 = ignore.
(A binary task stores its foreground as 1, not 255: 255 is ignore.) An id is the image's path under ``images/``
without extension (``train/street_01``), which is also what split files list. Without split files, the labelled
set is every training image with a mask, the unlabelled set every other training or ``unlabelled/`` image, and
validation all of ``images/val``; ``hafis prepare folder ROOT --labelled N`` draws a seeded labelled subset.
Boxes for the detector: one box per connected region of each class except one named ``background``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import IGNORE_INDEX, DataError
from .io import IMAGE_EXTENSIONS, Problem, boxes_from_connected_components, find_image
from .layout import DatasetLayout

BACKGROUND_NAMES = ("background", "_background_", "bg")


def read_class_list(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} is missing (one class name a line, line i = class id i)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"class list {path} is not UTF-8 text (byte offset {exc.start})") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if len(names) < 2:
        raise DataError(f"class list {path} names {len(names)} class(es); a segmentation task needs at least 2")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"class list {path} names {len(names)} classes; at most {IGNORE_INDEX} fit (255 = ignore)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"class list {path} repeats class name(s): {', '.join(dup)}")
    return names


class ImageFolder(DatasetLayout):
    name = "folder"

    def __init__(self, root, classes: Optional[str] = None) -> None:
        super().__init__(root)
        classes_file = Path(classes).expanduser() if classes else self.root / "classes.txt"
        if not classes_file.is_absolute() and classes:
            classes_file = self.root / classes_file
        self.classes_file = classes_file
        self.class_names = read_class_list(classes_file)
        self.thing_classes = tuple(i for i, n in enumerate(self.class_names) if n.lower() not in BACKGROUND_NAMES)
        self.images = self.root / "images"
        self.masks = self.root / "masks"

    def normalize_id(self, token: str) -> str:
        p = Path(token)
        parts = p.parts
        if parts and parts[0] in ("images", "masks"):
            p = Path(*parts[1:])
        return p.with_suffix("").as_posix() if p.suffix.lower() in IMAGE_EXTENSIONS else p.as_posix()

    def _scan(self, sub: str, required: bool) -> list[str]:
        folder = self.images / sub
        if not folder.is_dir():
            if required:
                raise FileNotFoundError(f"{folder} is missing (see the folder format in hafis.data.folder)")
            return []
        ids = {p.relative_to(self.images).with_suffix("").as_posix()
               for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
        return sorted(ids)

    def labelled_pool(self) -> list[str]:
        return [i for i in self._scan("train", True) if self.mask_path(i, "labelled") is not None]

    def train_pool(self) -> list[str]:
        return self._scan("train", True) + self._scan("unlabelled", False)

    def val_ids(self) -> list[str]:
        return self._scan("val", True)

    def image_path(self, id: str, part: str) -> Path:
        path = Path(id)
        return find_image(self.images / path.parent, path.name) or self.images / f"{id}.jpg"

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        p = self.masks / f"{id}.png"
        return p if p.is_file() else None

    def expected_mask_path(self, id: str, part: str) -> Path:
        return self.masks / f"{id}.png"

    def check_mask(self, path: Path, size) -> list[Problem]:
        problems = super().check_mask(path, size)
        if self.num_classes == 2 and not problems:
            values = set(np.unique(self.read_mask(path)).tolist())
            if IGNORE_INDEX in values and values <= {0, IGNORE_INDEX}:
                problems.append(Problem(str(path), "mask holds only 0 and 255, and 255 means ignore: store the "
                                                   "foreground of a binary task as 1"))
        return problems

    def boxes(self, id: str, part: str, mask: Optional[np.ndarray]):
        if mask is None:
            return super().boxes(id, part, mask)
        return boxes_from_connected_components(mask, self.thing_classes)


__all__ = ["ImageFolder", "read_class_list"]
