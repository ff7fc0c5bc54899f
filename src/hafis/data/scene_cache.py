"""Generated datasets (the synthetic scenes, the garments) stored as one ``.npz`` of stacked arrays per split.

Images and masks are stacked; the variable number of boxes per image is concatenated with per-image offsets. A cache
file is written atomically (temporary file, then rename) and checked on reading, so a truncated or mismatched file
is regenerated instead of failing or training on junk, and a read-only or full cache folder only costs the cache.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hafis.files import atomic_write

from .base import Sample

ARRAYS = ("images", "masks", "boxes", "box_labels", "box_offsets")


class CacheMismatch(ValueError):
    """A cache file that reads but does not hold what its name promises."""


def stack_samples(samples: Iterable[Sample], n: int, size: int) -> dict[str, np.ndarray]:
    """``n`` square samples of side ``size`` as the stacked arrays of :data:`ARRAYS`."""
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    boxes, labels, offsets = [], [], np.zeros(n + 1, np.int64)
    for i, sample in enumerate(samples):
        images[i], masks[i] = sample.image, sample.mask
        boxes.append(sample.boxes)
        labels.append(sample.box_labels)
        offsets[i + 1] = offsets[i] + len(sample.boxes)
    return {"images": images, "masks": masks,
            "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            "box_labels": np.concatenate(labels) if labels else np.zeros((0,), np.int64),
            "box_offsets": offsets}


def check_arrays(arrays: dict[str, np.ndarray], n: int, size: int) -> None:
    """Raise :class:`CacheMismatch` unless ``arrays`` hold ``n`` samples of side ``size``."""
    offsets = arrays["box_offsets"]
    total = int(offsets[-1]) if len(offsets) else -1
    expected = {"images": ((n, size, size, 3), np.uint8), "masks": ((n, size, size), np.uint8),
                "boxes": ((total, 4), np.float32), "box_labels": ((total,), np.int64),
                "box_offsets": ((n + 1,), np.int64)}
    for name, (shape, dtype) in expected.items():
        got = arrays[name]
        if got.shape != shape or got.dtype != dtype:
            raise CacheMismatch(f"{name} has shape {got.shape} {got.dtype}, expected {shape} {np.dtype(dtype)}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise CacheMismatch("box offsets are not increasing from 0")


def read_cache(path: Path, n: int, size: int, what: str) -> Optional[dict[str, np.ndarray]]:
    """The arrays of ``path``, or None (with a warning naming ``what`` when the file exists but is unusable)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ARRAYS}
        check_arrays(arrays, n, size)
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        warnings.warn(f"{what} cache file {path} is unreadable ({type(err).__name__}: {err}); regenerating")
        return None
    return arrays


def write_cache(path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    """Write atomically, so readers never see a partial file; a failure only warns (the data stays in memory)."""
    try:
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError as err:
        warnings.warn(f"could not write {what} cache file ({err}); continuing without cache")
