"""The one interface every dataset reader implements: a list of samples, each loaded as plain numpy arrays.

Readers (synthetic scenes, Pascal VOC, Cityscapes, COCO, ADE20K, a user's folder) only decode files; augmentation
lives in :mod:`hafis.data.transforms` and the labelled / unlabelled streams in :mod:`hafis.data.ssl`. Keeping readers
free of torch and of augmentation lets `hafis prepare` validate a tree and the detector reuse the same boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from hafis.errors import UserError

IGNORE_INDEX = 255


class DataError(UserError, ValueError):
    """A sample cannot be used: unreadable file, wrong size, or a label value outside the class range.

    The message names the file (or the sample id where the reader has no file) and the offending value.
    """


@dataclass
class Sample:
    """One image with its annotations, as loaded from disk.

    image: ``(H, W, 3)`` uint8 RGB.
    mask: ``(H, W)`` uint8 class ids, 255 = ignore; ``None`` for an unlabelled image with no mask on disk.
    boxes: ``(n, 4)`` float32 ``x0, y0, x1, y1`` in pixels (x1/y1 exclusive) of object instances; may be empty.
    box_labels: ``(n,)`` int64 semantic class id of each box.
    id: the image id as it appears in split lists.
    """

    image: np.ndarray
    mask: Optional[np.ndarray]
    id: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


class SegmentationSource:
    """Base class of dataset readers: ``len(source)``, ``source.load(i) -> Sample``, ``source.ids``."""

    class_names: Sequence[str] = ()
    #: classes the detector has a channel for (things); background / stuff are excluded from box masks.
    thing_classes: Sequence[int] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> Sequence[str]:  # pragma: no cover - implemented by readers
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Sample:  # pragma: no cover - implemented by readers
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages (readers with files name them)."""
        return f"sample {self.ids[index]!r} of {type(self).__name__}"


def load_checked(source: SegmentationSource, index: int) -> Sample:
    """``source.load(index)`` whose failures become :class:`DataError` naming the file, with labels range-checked."""
    try:
        sample = source.load(index)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises all three for broken files
        raise DataError(f"cannot read {source.describe(index)}: {exc}") from exc
    if sample.mask is not None:
        bad = (sample.mask >= source.num_classes) & (sample.mask != IGNORE_INDEX)
        if bad.any():
            raise DataError(f"{source.describe(index)}: label value {int(sample.mask[bad][0])} is outside "
                            f"[0, {source.num_classes}) and not the ignore value {IGNORE_INDEX}")
    return sample
