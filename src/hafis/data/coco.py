"""MS COCO (81 classes: background + the 80 thing categories), semantic masks rasterised from the instances.

Tree (``data.root``)::

    train2017/<12-digit id>.jpg
    val2017/<12-digit id>.jpg
    annotations/instances_train2017.json
    annotations/instances_val2017.json

Classes are background (0) followed by the JSON's categories in increasing category id (COCO's ids 1-90 with gaps
become 1-80), so any COCO-format instances file (a user's own) works too. Ids are the image file stems
(``000000000009``); split files may hold ids or paths (``train2017/000000000009.jpg ...``).

Rasterisation (pycocotools): every annotation of an image, polygons and RLE (compressed or not), is decoded and
painted in order of decreasing area, ties in annotation order, so where instances overlap *the smaller one wins, and
of equal ones the later*; crowd regions (``iscrowd: 1``) are painted as 255 (ignore) under the same rule.
Masks are rasterised once and cached as PNGs under ``<cache>/coco/<json name>-<digest>/masks/`` (``data.cache_dir``,
else ``$HAFIS_CACHE`` / ``~/.cache/hafis``); a compact index (image sizes, boxes, categories) is cached beside them, so
once ``hafis prepare coco ROOT`` has run, training never parses the 450 MB JSON. The cache key includes the JSON's
path, size and modification time. Unlabelled images read a cached mask when there is one (for pseudo-label
diagnostics) and otherwise have none. Boxes: each non-crowd annotation's ``bbox`` (``x, y, w, h`` ->
``x0, y0, x0 + w, y0 + h``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hafis.files import atomic_write, json_dumps

from .base import IGNORE_INDEX, DataError
from .io import Problem, check_image, hafis_cache_dir, read_label, save_label_png, stack_boxes
from .layout import DatasetLayout

#: bump when the rasterisation or the index format changes, so stale caches are never read
FORMAT_VERSION = 1

SPLITS = {"train": "train2017", "val": "val2017"}

#: COCO 2017's 80 thing categories as ``(category id, name)``; the ids run 1-90 with gaps. For reference and
#: tests: the reader takes the categories from the JSON itself.
COCO_CATEGORIES = tuple(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None, "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush"), start=1))
COCO_CATEGORIES = tuple((i, n) for i, n in COCO_CATEGORIES if n is not None)


def _mask_utils():
    """pycocotools' mask module; it is an optional dependency (``pip install 'hafis[coco]'``), needed only here."""
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError("rasterising COCO masks needs pycocotools: pip install 'hafis[coco]'") from None
    return mask


def annotation_rle(segmentation: Any, height: int, width: int) -> Optional[dict]:
    """One RLE for an annotation's segmentation: polygons (merged), uncompressed or compressed RLE; ``None`` when
    it has no usable polygon (fewer than 3 points)."""
    mask_utils = _mask_utils()

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} differs from the image's {[height, width]}")
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")


def rasterise(annotations: list[dict], height: int, width: int, label_of: dict[int, int]) -> np.ndarray:
    """The semantic mask of one image: larger instances first so smaller (then later) ones win; crowd -> 255."""
    mask_utils = _mask_utils()

    layers = []
    for order, ann in enumerate(annotations):
        rle = annotation_rle(ann.get("segmentation"), height, width)
        if rle is None:
            continue
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            region = mask_utils.decode(rle).astype(bool)
        if region.ndim == 3:
            region = region.any(axis=2)
        value = IGNORE_INDEX if ann.get("iscrowd", 0) else label_of[int(ann["category_id"])]
        layers.append((-int(region.sum()), order, region, value))
    mask = np.zeros((height, width), np.uint8)
    for _, _, region, value in sorted(layers, key=lambda t: (t[0], t[1])):
        mask[region] = value
    return mask


class COCO(DatasetLayout):
    name = "coco"

    def __init__(self, root, cache_dir=None) -> None:
        super().__init__(root)
        self.cache_root = hafis_cache_dir(cache_dir) / "coco"
        self._index: dict[str, dict] = {}
        self._annotations: dict[str, dict[int, list]] = {}

    # ---- index
    def json_path(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{SPLITS[split]}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / SPLITS[split]

    def cache_dir(self, split: str) -> Path:
        path = self.json_path(split)
        st = path.stat()
        key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, FORMAT_VERSION])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return self.cache_root / f"{path.stem}-{digest}"

    def _read_json(self, split: str) -> dict:
        path = self.json_path(split)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (COCO instances annotations)")
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DataError(f"{path} is not valid JSON ({' '.join(str(exc).split())})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise DataError(f"{path} has no {key!r} list; is it a COCO instances file?")
        return data

    def index(self, split: str) -> dict:
        """``{'categories': [[id, name]...], 'images': {stem: [image_id, file_name, h, w]},
        'boxes': {stem: [...]}}``."""
        if split in self._index:
            return self._index[split]
        cache = self.cache_dir(split) / "index.json"
        index = None
        if cache.is_file():
            try:
                index = json.loads(cache.read_text())
            except (OSError, ValueError):
                index = None
        if index is None:
            data = self._read_json(split)
            try:
                index = self._build_index(data)
            except (KeyError, TypeError, ValueError) as exc:
                what = f"an entry lacks the key {exc}" if isinstance(exc, KeyError) else \
                    f"a value cannot be read ({' '.join(str(exc).split())})"
                raise DataError(f"{self.json_path(split)} is not a usable COCO instances file: {what}") from None
            self._store_annotations(split, data)
            try:
                atomic_write(cache, json_dumps(index))
            except OSError:
                pass  # a read-only cache only costs the parse next time
        self._index[split] = index
        return index

    @staticmethod
    def _build_index(data: dict) -> dict:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        label_of = {cid: i + 1 for i, (cid, _) in enumerate(categories)}
        images, boxes = {}, {}
        by_id = {}
        for im in data["images"]:
            stem = Path(im["file_name"]).stem
            images[stem] = [int(im["id"]), im["file_name"], int(im["height"]), int(im["width"])]
            by_id[int(im["id"])] = stem
            boxes[stem] = []
        for ann in data["annotations"]:
            stem = by_id.get(int(ann["image_id"]))
            if stem is None or ann.get("iscrowd", 0) or int(ann.get("category_id", -1)) not in label_of:
                continue
            x, y, w, h = (float(v) for v in ann.get("bbox", (0, 0, 0, 0)))
            if w > 0 and h > 0:
                boxes[stem].append([x, y, x + w, y + h, label_of[int(ann["category_id"])]])
        return {"version": FORMAT_VERSION, "categories": [list(c) for c in categories], "images": images,
                "boxes": boxes}

    def _store_annotations(self, split: str, data: dict) -> None:
        by_image: dict[int, list] = {int(im["id"]): [] for im in data["images"]}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        self._annotations[split] = by_image

    def annotations(self, split: str) -> dict[int, list]:
        """Annotations by image id, parsed from the JSON on first use (only to rasterise masks not cached yet)."""
        if split not in self._annotations:
            self._store_annotations(split, self._read_json(split))
        return self._annotations[split]

    def label_of(self, split: str = "train") -> dict[int, int]:
        return {int(cid): i + 1 for i, (cid, _) in enumerate(self.index(split)["categories"])}

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("background",) + tuple(name for _, name in self.index("train")["categories"])

    @property
    def thing_classes(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(range(1, self.num_classes))

    # ---- ids
    @staticmethod
    def _split(part: str) -> str:
        return "val" if part == "val" else "train"

    def normalize_id(self, token: str) -> str:
        return Path(token).stem

    def train_pool(self) -> list[str]:
        return sorted(self.index("train")["images"])

    def labelled_pool(self) -> list[str]:
        return self.train_pool()

    def val_ids(self) -> list[str]:
        return sorted(self.index("val")["images"])

    # ---- files
    def image_path(self, id: str, part: str) -> Path:
        split = self._split(part)
        record = self.index(split)["images"].get(id)
        return self.image_dir(split) / (record[1] if record else f"{id}.jpg")

    def cached_mask(self, id: str, part: str) -> Path:
        return self.cache_dir(self._split(part)) / "masks" / f"{id}.png"

    def mask_path(self, id: str, part: str) -> Optional[Path]:
        path = self.cached_mask(id, part)
        if path.is_file():
            return path
        if part == "unlabelled":
            return None
        self.rasterise_to_cache(id, part)
        return path

    def rasterise_to_cache(self, id: str, part: str) -> np.ndarray:
        split = self._split(part)
        record = self.index(split)["images"].get(id)
        if record is None:
            raise FileNotFoundError(f"image id {id!r} is not in {self.json_path(split)}")
        image_id, file_name, h, w = record
        try:
            mask = rasterise(self.annotations(split).get(image_id, []), h, w, self.label_of(split))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"category id {exc} is not in 'categories'" if isinstance(exc, KeyError) else " ".join(
                str(exc).split())
            raise DataError(f"{self.json_path(split)}: an annotation of image {file_name} cannot be rasterised: "
                            f"{what} (`hafis prepare coco {self.root}` lists every problem)") from None
        save_label_png(self.cached_mask(id, part), mask)
        return mask

    def expected_mask_path(self, id: str, part: str) -> Path:
        return self.cached_mask(id, part)

    def warm_cache(self, ids, part: str) -> int:
        """Rasterise the masks of ``ids`` that are not cached yet (once, in the main process, so data-loader
        workers never parse the JSON); returns how many were made."""
        missing = [i for i in ids if not self.cached_mask(i, part).is_file()]
        for id in missing:
            self.rasterise_to_cache(id, part)
        return len(missing)

    def read_mask(self, path: Path) -> np.ndarray:
        return read_label(path)

    def boxes(self, id: str, part: str, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = self.index(self._split(part))["boxes"].get(id, [])
        return stack_boxes([r[:4] for r in rows], [int(r[4]) for r in rows])

    # ---- validation
    def check(self, ids, part: str, mask_required=None) -> list[Problem]:
        """Image files against the JSON (missing, unreadable, other size) and every annotation (unknown category,
        unusable segmentation); rasterises and caches each mask on the way."""
        split = self._split(part)
        problems: list[Problem] = []
        index = self.index(split)
        label_of = self.label_of(split)
        anns = self.annotations(split)
        json_file = str(self.json_path(split))
        for id in ids:
            record = index["images"].get(id)
            if record is None:
                problems.append(Problem(str(self.image_dir(split) / f"{id}.jpg"),
                                        f"image id {id!r} is not listed in {json_file}"))
                continue
            image_id, file_name, h, w = record
            size, found = check_image(self.image_dir(split) / file_name)
            problems += found
            if size is not None and size != (h, w):
                problems.append(Problem(str(self.image_dir(split) / file_name),
                                        f"image is {size[1]}x{size[0]} but {json_file} says {w}x{h}"))
            ok = True
            for ann in anns.get(image_id, []):
                where = f"{json_file} (annotation {ann.get('id')} of image {file_name})"
                if int(ann.get("category_id", -1)) not in label_of:
                    problems.append(Problem(where, f"category id {ann.get('category_id')} is not in 'categories'"))
                    ok = False
                    continue
                try:
                    annotation_rle(ann.get("segmentation"), h, w)
                except Exception as exc:
                    problems.append(Problem(where, f"unusable segmentation ({type(exc).__name__}: {exc})"))
                    ok = False
            if ok and not self.cached_mask(id, part).is_file():
                self.rasterise_to_cache(id, part)
        return problems


__all__ = ["COCO", "COCO_CATEGORIES", "FORMAT_VERSION", "annotation_rle", "rasterise"]
