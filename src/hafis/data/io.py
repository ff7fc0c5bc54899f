"""File-level helpers shared by the dataset readers: decoding images and label PNGs, boxes, problems, caches.

Everything here is plain numpy + Pillow, so readers stay free of torch (see :mod:`hafis.data.base`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from hafis.files import atomic_write

from .base import IGNORE_INDEX, DataError

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def hafis_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir`` if given, else ``$HAFIS_CACHE``, else ``~/.cache/hafis``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("HAFIS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hafis"


# ---------------------------------------------------------------------------------------------------- decoding
@contextlib.contextmanager
def open_image(path: PathLike) -> Iterator[Image.Image]:
    """``Image.open(path)`` whose failures, Pillow's decompression-bomb limit included, are a :class:`DataError`
    naming the file (a worker process passes it on as one line)."""
    try:
        with Image.open(path) as im:
            yield im
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is refused: {exc}") from None
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises all three for broken files
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {' '.join(str(exc).split())})") from None


def read_image(path: PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; grey, palette and RGBA images are converted. Raises :class:`DataError`."""
    with open_image(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def photo_array(image: Union[PathLike, Image.Image]) -> np.ndarray:
    """A photograph as it is displayed, ``(H, W, 3)`` uint8 RGB: EXIF orientation applied; grey, palette, RGBA
    (alpha dropped), CMYK and 16-bit images converted (16-bit values scaled to 8 bits, not clipped).

    Raises ``OSError`` / ``ValueError`` / ``SyntaxError`` (and ``Image.DecompressionBombError``) for a file Pillow
    cannot decode."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            return photo_array(im)
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit grey (Pillow opens it as I;16 or I)
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)), 0, 255)
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def photo_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` of :func:`photo_array`'s result, from the file header (EXIF orientations 5-8 swap the sides)."""
    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (w, h) if turned else (h, w)


def read_label(path: PathLike) -> np.ndarray:
    """A single-channel label PNG as ``(H, W)`` uint8 class ids.

    Palette PNGs (VOC) give their *indices*, not their colours; 8-bit grey PNGs their values; 16-bit PNGs are
    accepted when every value fits in 0-255. A colour (RGB) mask is an error: its colours are not class ids.
    """
    with open_image(path) as im:
        if im.mode in ("P", "L"):
            return np.asarray(im, dtype=np.uint8).copy()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(im)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise DataError(f"{path}: label values {int(arr.min())}..{int(arr.max())} do not fit in 0-255")
            return arr.astype(np.uint8)
        if im.mode == "1":
            return np.asarray(im, dtype=np.uint8).copy()
        raise DataError(
            f"{path}: label image has mode {im.mode!r}; expected a single-channel PNG of class ids "
            "(8-bit grey 'L' or palette 'P'), not a colour rendering")


def read_instance_ids(path: PathLike) -> np.ndarray:
    """A 16/32-bit instance-id PNG (Cityscapes ``*_instanceIds.png``, VOC ``SegmentationObject``) as int32."""
    with open_image(path) as im:
        return np.asarray(im).astype(np.int32)


def image_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` from the file header (no decoding)."""
    with open_image(path) as im:
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


def stack_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    if not boxes:
        return empty_boxes()
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _slices_to_boxes(slices: Sequence[Optional[tuple]]) -> np.ndarray:
    """``scipy.ndimage.find_objects`` slices -> ``(n, 4)`` float32 ``x0, y0, x1, y1`` (x1 / y1 exclusive)."""
    rows = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices]
    return np.asarray(rows, np.float32).reshape(-1, 4)


def boxes_from_instance_mask(instance_ids: np.ndarray, semantic: Optional[np.ndarray] = None, *,
                             ignore_index: int = IGNORE_INDEX, background_id: int = 0,
                             min_area: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tight boxes of every instance of an instance-id map, and each instance's semantic class.

    ``instance_ids``: ``(H, W)`` ints; ``background_id`` (0) and ``ignore_index`` (255, VOC's object borders) are no
    instance; any other value is one instance (Cityscapes' ``class * 1000 + k`` ids work as they are).
    ``semantic``: ``(H, W)`` class ids; pixels where it is ``ignore_index`` do not count, and an instance's label is
    the most frequent semantic class of its pixels (without ``semantic`` the label is the instance id itself).
    Instances with fewer than ``min_area`` counted pixels are dropped. Returns ``(boxes (n, 4) float32 x0, y0, x1, y1
    with x1 / y1 exclusive, labels (n,) int64)``, in increasing instance id. Vectorised: one ``np.unique``, one
    ``find_objects`` and one ``bincount``, no loop over pixels.
    """
    from scipy import ndimage

    inst = np.asarray(instance_ids)
    keep = (inst != background_id) & (inst != ignore_index)
    if semantic is not None:
        sem = np.asarray(semantic)
        if sem.shape != inst.shape:
            raise ValueError(f"semantic mask {sem.shape} and instance map {inst.shape} differ in shape")
        keep &= sem != ignore_index
    ids, compact = np.unique(inst[keep], return_inverse=True)
    if ids.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    n = ids.size
    label_map = np.zeros(inst.shape, np.int64)  # 0 = no instance, 1..n = the instances in increasing id
    label_map[keep] = compact.ravel() + 1
    slices = ndimage.find_objects(label_map, max_label=n)
    area = np.bincount(label_map.ravel(), minlength=n + 1)[1:]
    if semantic is not None:
        num_sem = int(sem[keep].max()) + 1
        joint = np.bincount(label_map[keep] * num_sem + sem[keep].astype(np.int64),
                            minlength=(n + 1) * num_sem).reshape(n + 1, num_sem)[1:]
        labels = joint.argmax(axis=1).astype(np.int64)
    else:
        labels = ids.astype(np.int64)
    ok = area >= max(min_area, 1)
    boxes = _slices_to_boxes([s for s, k in zip(slices, ok, strict=True) if k])
    return boxes, labels[ok]


def boxes_from_connected_components(semantic: np.ndarray, classes: Sequence[int], min_area: int = 0, *,
                                    connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """One box per connected component of each class in ``classes`` (for masks without instance annotations).

    ``connectivity`` 8 (default, diagonal neighbours join) or 4. Components with fewer than ``min_area`` pixels are
    dropped (the authors keep components over 90 px for thin classes). Returns boxes ordered by class, then by
    component label (raster order of each component's first pixel). The loop is over classes; each class is one
    ``ndimage.label`` + ``find_objects`` + ``bincount``.
    """
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    sem = np.asarray(semantic)
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    all_boxes, all_labels = [], []
    for c in classes:
        comp, n = ndimage.label(sem == c, structure=structure)
        if n == 0:
            continue
        area = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        ok = area >= min_area
        boxes = _slices_to_boxes([s for s, k in zip(ndimage.find_objects(comp), ok, strict=True) if k])
        all_boxes.append(boxes)
        all_labels.append(np.full(len(boxes), c, np.int64))
    if not all_boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(all_boxes), np.concatenate(all_labels)


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


# ------------------------------------------------------------------------------------------------------- write
def save_label_png(path: Path, mask: np.ndarray) -> None:
    """Atomically write a ``(H, W)`` uint8 mask as an 8-bit grey PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
