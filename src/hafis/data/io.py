"""File-level helpers shared by the dataset readers: decoding images and label PNGs, boxes, problems, caches.

Everything here is plain numpy + Pillow, so readers stay free of torch (see :mod:`hafis.data.base`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .base import IGNORE_INDEX

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def hafis_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir`` if given, else ``$HAFIS_CACHE``, else ``~/.cache/hafis``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("HAFIS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hafis"


# ---------------------------------------------------------------------------------------------------- decoding
def read_image(path: PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; grey, palette and RGBA images are converted.

    Raises ``FileNotFoundError`` / ``OSError``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: PathLike) -> np.ndarray:
    """A single-channel label PNG as ``(H, W)`` uint8 class ids.

    Palette PNGs (VOC) give their *indices*, not their colours; 8-bit grey PNGs their values; 16-bit PNGs are
    accepted when every value fits in 0-255. A colour (RGB) mask is an error: its colours are not class ids.
    """
    with Image.open(path) as im:
        if im.mode in ("P", "L"):
            return np.asarray(im, dtype=np.uint8).copy()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(im)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"{path}: label values {int(arr.min())}..{int(arr.max())} do not fit in 0-255")
            return arr.astype(np.uint8)
        if im.mode == "1":
            return np.asarray(im, dtype=np.uint8).copy()
        raise ValueError(
            f"{path}: label image has mode {im.mode!r}; expected a single-channel PNG of class ids "
            "(8-bit grey 'L' or palette 'P'), not a colour rendering")


def read_instance_ids(path: PathLike) -> np.ndarray:
    """A 16/32-bit instance-id PNG (Cityscapes ``*_instanceIds.png``, VOC ``SegmentationObject``) as int32."""
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int32)


def image_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` from the file header (no decoding)."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def find_image(folder: Path, stem: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Optional[Path]:
    """``folder/stem.<ext>`` for the first extension that exists (lower or upper case), else ``None``."""
    for ext in extensions:
        for e in (ext, ext.upper()):
            p = folder / f"{stem}{e}"
            if p.is_file():
                return p
    return None


# ------------------------------------------------------------------------------------------------------- boxes
def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def box_of(region: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    """Tight ``x0, y0, x1, y1`` (x1 / y1 exclusive) of the True pixels of ``region``, ``None`` when empty."""
    ys = np.flatnonzero(region.any(axis=1))
    if len(ys) == 0:
        return None
    xs = np.flatnonzero(region.any(axis=0))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def stack_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    if not boxes:
        return empty_boxes()
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def boxes_from_instances(instances: np.ndarray, labels_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of an instance-id map: ``labels_of`` maps each instance id to its class (ids not in it are skipped)."""
    boxes, labels = [], []
    for inst in np.unique(instances):
        inst = int(inst)
        if inst not in labels_of:
            continue
        box = box_of(instances == inst)
        if box is not None:
            boxes.append(box)
            labels.append(labels_of[inst])
    return stack_boxes(boxes, labels)


def boxes_from_components(mask: np.ndarray, classes: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """One box per 8-connected region of each class in ``classes`` (a fallback when no instance masks exist:
    touching objects of one class give one box)."""
    from scipy import ndimage

    boxes, labels = [], []
    structure = np.ones((3, 3), bool)
    for c in classes:
        region = mask == c
        if not region.any():
            continue
        lab, n = ndimage.label(region, structure=structure)
        for sl in ndimage.find_objects(lab):
            if sl is None:
                continue
            ys, xs = sl
            boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
            labels.append(int(c))
    return stack_boxes(boxes, labels)


# ---------------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset tree, with the file it concerns."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def check_image(path: Path, decode: bool = True) -> tuple[Optional[tuple[int, int]], list[Problem]]:
    """``((H, W) or None, problems)`` of an image file: missing, unreadable, or not decodable."""
    if not path.is_file():
        return None, [Problem(str(path), "missing image")]
    try:
        with Image.open(path) as im:
            w, h = im.size
            if decode:
                im.load()
    except Exception as exc:  # truncated, not an image, permission: all mean "unreadable" to the user
        return None, [Problem(str(path), f"unreadable image ({type(exc).__name__}: {exc})")]
    return (h, w), []


def check_label_values(path: str, mask: np.ndarray, num_classes: int, size: Optional[tuple[int, int]]) -> list[Problem]:
    """A mask's size against its image's and its values against ``0..num_classes-1`` and 255."""
    problems = []
    if size is not None and mask.shape[:2] != tuple(size):
        problems.append(Problem(path, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                                      f"{size[1]}x{size[0]}"))
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        problems.append(Problem(path, f"label value(s) {shown} outside the class range 0..{num_classes - 1} "
                                      f"(255 = ignore)"))
    return problems


# ------------------------------------------------------------------------------------------------ atomic write
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder + rename, so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_label_png(path: Path, mask: np.ndarray) -> None:
    """Atomically write a ``(H, W)`` uint8 mask as an 8-bit grey PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
