"""The on-disk layout of a real dataset: which image ids exist, where their files are, how to read and check them.

One :class:`DatasetLayout` subclass per format (Pascal VOC, Cityscapes, COCO, ADE20K, a user's folder). A layout
knows three id pools:

- ``labelled_pool()``: training images that *can* be labelled (their mask exists or can be made); published
  labelled splits and ``hafis prepare --labelled`` draw from it;
- ``train_pool()``: every training image (the labelled pool and images usable only as unlabelled);
- ``val_ids()``: the evaluation images (each needs a mask).

:func:`hafis.data.build_sources` turns a layout and the config's split files into the three readers
(:class:`LayoutSource`), and :mod:`hafis.data.splits` validates a tree and writes split files from the same pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .base import Sample, SegmentationSource
from .io import Problem, check_image, check_label_values, empty_boxes, read_image, read_label

#: the three roles an id can have in a run
PARTS = ("labelled", "unlabelled", "val")


class DatasetLayout:
    """Base class of the real-dataset formats. Subclasses set ``name``, ``class_names``, ``thing_classes`` and
    implement the pools and the path methods; :meth:`load` and :meth:`check` work from those."""

    name = "base"
    class_names: Sequence[str] = ()
    thing_classes: Sequence[int] = ()

    def __init__(self, root) -> None:
        if root is None:
            raise FileNotFoundError(f"data.root is not set; dataset {self.name!r} needs the folder it is stored in")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- ids
    def normalize_id(self, token: str) -> str:
        """The id named by one token of a split file (published lists put paths there); default: the file stem."""
        return Path(token).stem

    def labelled_pool(self) -> list[str]:
        raise NotImplementedError

    def train_pool(self) -> list[str]:
        raise NotImplementedError

    def val_ids(self) -> list[str]:
        raise NotImplementedError

    def split_subdir(self) -> str:
        """Sub-folder of ``ROOT/splits/`` that ``hafis prepare`` writes into (VOC: its setting)."""
        return ""

    # ---- files
    def image_path(self, id: str, part: str) -> Path:
        raise NotImplementedError

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        """The mask file of ``id`` (``None`` when there is none on disk)."""
        raise NotImplementedError

    def read_mask(self, path: Path) -> np.ndarray:
        return read_label(path)

    def warm_cache(self, ids: Sequence[str], part: str) -> int:
        """Make whatever the reader caches for ``ids`` (COCO: rasterised masks); returns how many were made."""
        return 0

    def boxes(self, id: str, part: str, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return empty_boxes()

    def load(self, id: str, part: str) -> Sample:
        image = read_image(self.image_path(id, part))
        mask_file = self.mask_path(id, part)
        mask = None
        if mask_file is not None:
            mask = self.read_mask(mask_file)
        elif part != "unlabelled":
            raise FileNotFoundError(f"{part} image {id!r} of {self.root} has no mask "
                                    f"(run `hafis prepare {self.name} {self.root}` to check the tree)")
        if mask is not None and mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"{self.image_path(id, part)} is {image.shape[1]}x{image.shape[0]}")
        boxes, labels = self.boxes(id, part, mask)
        return Sample(image=image, mask=mask, id=id, boxes=boxes, box_labels=labels)

    # ---- validation
    def check(self, ids: Iterable[str], part: str, mask_required: Optional[bool] = None) -> list[Problem]:
        """Every problem of these ids' files: missing / unreadable image or mask, wrong mask size, bad values."""
        required = part != "unlabelled" if mask_required is None else mask_required
        problems: list[Problem] = []
        for id in ids:
            image_file = self.image_path(id, part)
            size, found = check_image(image_file)
            problems += found
            mask_file = self.mask_path(id, part)
            if mask_file is None:
                if required:
                    problems.append(Problem(str(self.expected_mask_path(id, part)),
                                            f"missing mask of {part} image {id!r}"))
                continue
            problems += self.check_mask(mask_file, size)
        return problems

    def expected_mask_path(self, id: str, part: str) -> Path:
        """Where a missing mask was looked for first (for the problem report)."""
        raise NotImplementedError

    def check_mask(self, path: Path, size: Optional[tuple[int, int]]) -> list[Problem]:
        try:
            mask = self.read_mask(path)
        except Exception as exc:
            return [Problem(str(path), f"unreadable mask ({type(exc).__name__}: {exc})")]
        return check_label_values(str(path), mask, self.num_classes, size)


class LayoutSource(SegmentationSource):
    """The reader of one part (``labelled`` / ``unlabelled`` / ``val``) of a layout, over a fixed id list."""

    def __init__(self, layout: DatasetLayout, ids: Sequence[str], part: str) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.layout, self.part = layout, part
        self._ids = tuple(ids)
        self.class_names = tuple(layout.class_names)
        self.thing_classes = tuple(layout.thing_classes)

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def load(self, index: int) -> Sample:
        return self.layout.load(self._ids[index], self.part)

    def describe(self, index: int) -> str:
        id = self._ids[index]
        where = f"{self.part} image {id!r} of {self.layout.name} ({self.layout.image_path(id, self.part)}"
        try:
            mask = self.layout.mask_path(id, self.part)
        except Exception:  # describing must not fail (e.g. a COCO mask that cannot be rasterised)
            mask = None
        return where + (f", mask {mask})" if mask is not None else ")")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.name}, {self.part}, {len(self)} images, root={self.layout.root})"
