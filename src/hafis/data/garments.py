"""Garments: real objects (Fashion-MNIST) on real photographs and textures (``skimage.data``), with exact masks.

Procedural shapes are too unlike the images SSL methods are published on; real segmentation sets are too large for
a CPU benchmark. This source sits in between: every image is a random crop of a real photograph or texture that
ships with scikit-image (no network), with 1..N Fashion-MNIST garments pasted at random scale, position and colour.
A garment's mask comes from its own pixels (intensity above a threshold after resizing), so the labels are exact;
later garments occlude earlier ones; a 2 px band of 255 straddles every garment boundary (as Pascal VOC's) and every
visible garment gets a tight box, so the detector path runs too.

Splits: a training *pool* of ``num_train`` images built from Fashion-MNIST's training images only, and ``num_val``
validation images built from its test images only. The labelled split is the first ``num_labelled`` entries of one
seeded permutation of the pool, the unlabelled split the rest: pool image ``i`` does not depend on the split sizes,
and a larger labelled set contains a smaller one. Image ``i`` of a part comes from
``np.random.default_rng([seed, part_code, i])``; each part is generated once (vectorised numpy per image) and cached
as one ``.npz`` whose name hashes the generator's settings and the Fashion-MNIST files.

The idx files are read with a 20-line numpy reader rather than torchvision's ``FashionMNIST``: it reads ``.gz`` and
raw files alike from any folder (the Debian package ships only ``.gz``), needs no torchvision at data level, and
reports a truncated file by name. torchvision is used only for ``download: true``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from hafis.data.base import DataError, Sample, SegmentationSource
from hafis.data.scene_cache import read_cache, stack_samples, write_cache
from hafis.data.synthetic import SceneLayers, layers_to_sample
from hafis.fields import bounded, choice, nonneg, seed_value

__all__ = [
    "FINE_CLASSES",
    "COARSE_CLASSES",
    "BACKGROUNDS",
    "GarmentsConfig",
    "GarmentLayers",
    "FashionMNIST",
    "find_fashion_mnist",
    "read_idx",
    "render_garments",
    "GarmentScenes",
    "garment_splits",
]

#: Fashion-MNIST label ``l`` is fine class ``l + 1``.
FINE_CLASSES = ("background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                "bag", "ankle boot")
COARSE_CLASSES = ("background", "top", "trouser", "dress", "footwear", "bag")
#: fine class id -> coarse class id (background stays 0): tops, footwear grouped; 255 stays 255 (see _lut)
_FINE_TO_COARSE = (0, 1, 2, 1, 3, 1, 4, 1, 4, 5, 4)
#: the ``skimage.data`` images bundled with scikit-image (no download): photographs, textures, documents
BACKGROUNDS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
               "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")
#: part name -> code mixed into the seed
PARTS = {"train": 0, "val": 1}
#: bump whenever the generator's output changes, so stale caches are never read
FORMAT_VERSION = 1
#: Fashion-MNIST intensity (0-1) from which a resized garment pixel is opaque and labelled; the fainter fringe is
#: blended in partially (an anti-aliased edge) and falls in the ignore band
ALPHA_THRESHOLD = 20 / 255
#: a garment with fewer visible pixels after occlusion gets no box and its pixels become ignore
MIN_VISIBLE_AREA = 12
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class GarmentsConfig:
    """``data.garments``: where Fashion-MNIST is and what the generated images look like."""

    #: folder holding the four Fashion-MNIST idx files (``.gz`` or not); null = ``$HAFIS_FASHION_MNIST``, then
    #: /usr/share/datasets/fashion-mnist (Debian ``dataset-fashion-mnist``), then ``<cache>/FashionMNIST/raw``
    root: Optional[str] = None
    #: true: when no copy is found, torchvision downloads Fashion-MNIST into ``<cache>/FashionMNIST/raw``
    download: bool = False
    #: fine = the 10 garment classes + background; coarse = top, trouser, dress, footwear, bag + background (an
    #: easier task: the four upper-body garments and the three shoes are hard to tell apart at low resolution)
    classes: str = choice("fine", "fine", "coarse")
    #: side of the square images
    image_size: int = bounded(96, 16, 4096)
    #: training pool (from Fashion-MNIST's training images): labelled + unlabelled
    num_train: int = bounded(2000, 1, 10**6)
    #: labelled images, a seeded subset of the pool (1/32 of the default pool); = num_train: fully supervised
    num_labelled: int = nonneg(62, at_most="data.garments.num_train")
    #: unlabelled images: the pool images that follow the labelled ones in the same seeded permutation (a fixed,
    #: nested subset); null = every pool image that is not labelled
    num_unlabelled: Optional[int] = nonneg(None, 10**6)
    #: validation images (from Fashion-MNIST's test images only)
    num_val: int = bounded(500, 1, 10**6)
    #: garments per image, uniform in [min, max]; several give occlusion and context
    objects: tuple[int, int] = bounded((1, 3), 1, 254, ordered=True)
    #: garment side as a fraction of the image side, uniform in [min, max]: the scale variation of a real set
    scale: tuple[float, float] = bounded((0.3, 0.6), 0, 2, lo_open=True, ordered=True)
    #: strength of the background's random per-channel gain (0 = the photograph's own colours), so that a
    #: background's colour does not identify it
    background_jitter: float = nonneg(0.2)
    #: seed of the generated images
    seed: int = seed_value(0)
    #: seed of the labelled subset of the pool; null = ``seed`` (vary it to draw other labelled sets of one pool)
    split_seed: Optional[int] = seed_value(None)

    def __post_init__(self) -> None:
        if self.classes not in ("fine", "coarse"):
            raise ValueError(f"classes must be 'fine' or 'coarse', got {self.classes!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("num_train", "num_labelled", "num_val", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_labelled > self.num_train:
            raise ValueError(f"num_labelled ({self.num_labelled}) must be <= num_train ({self.num_train}): the "
                             "labelled images are drawn from the training pool")
        if self.num_unlabelled is not None and self.num_labelled + self.num_unlabelled > self.num_train:
            raise ValueError(f"num_labelled + num_unlabelled ({self.num_labelled} + {self.num_unlabelled}) must be "
                             f"<= num_train ({self.num_train}): both are drawn from the training pool")
        lo, hi = self.objects
        if not 1 <= lo <= hi <= 254:
            raise ValueError(f"objects must satisfy 1 <= min <= max <= 254, got {list(self.objects)}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 2:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 2 (fractions of the image side), "
                             f"got {list(self.scale)}")
        if self.background_jitter < 0:
            raise ValueError(f"background_jitter must be >= 0, got {self.background_jitter}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return FINE_CLASSES if self.classes == "fine" else COARSE_CLASSES

    def render_kwargs(self) -> dict:
        """The keyword arguments of :func:`render_garments` this config sets (hashed into the cache name)."""
        return {"image_size": self.image_size, "objects": tuple(self.objects), "scale": tuple(self.scale),
                "background_jitter": self.background_jitter}


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
class FashionMNIST(NamedTuple):
    """The four idx arrays: images ``(n, 28, 28)`` uint8, labels ``(n,)`` uint8 in 0..9; ``digest`` hashes the files."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    digest: str


def _cache_base(cache_dir: Union[str, os.PathLike, None]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("HAFIS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hafis"


def _idx_paths(folder: Path) -> Optional[dict[str, Path]]:
    """The four files in ``folder`` (raw preferred over ``.gz``), or None when any is missing."""
    paths = {}
    for key, name in _IDX_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                paths[key] = candidate
                break
        else:
            return None
    return paths


def search_paths(config: GarmentsConfig, cache_dir: Union[str, os.PathLike, None] = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order."""
    if config.root is not None:
        return [Path(config.root).expanduser()]
    folders = []
    if os.environ.get("HAFIS_FASHION_MNIST"):
        folders.append(Path(os.environ["HAFIS_FASHION_MNIST"]).expanduser())
    folders += [Path(_DEBIAN_DIR), _cache_base(cache_dir) / "FashionMNIST" / "raw"]
    return folders


def find_fashion_mnist(config: GarmentsConfig, cache_dir: Union[str, os.PathLike, None] = None) -> dict[str, Path]:
    """Paths of the four idx files; downloads with torchvision if allowed; else a DataError saying how to get them."""
    folders = search_paths(config, cache_dir)
    for folder in folders:
        paths = _idx_paths(folder)
        if paths is not None:
            return paths
    if config.download and config.root is None:
        target = _cache_base(cache_dir)
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            for train in (True, False):
                TorchvisionFashionMNIST(str(target), train=train, download=True)
        except Exception as exc:  # no network, a proxy, a full disk: all end the same way for the user
            raise DataError(f"could not download Fashion-MNIST into {target / 'FashionMNIST' / 'raw'}: "
                            f"{type(exc).__name__}: {exc}") from exc
        paths = _idx_paths(target / "FashionMNIST" / "raw")
        if paths is not None:
            return paths
    names = ", ".join(f"{n}[.gz]" for n in _IDX_FILES.values())
    raise DataError(f"Fashion-MNIST not found: searched {', '.join(map(str, folders))} for {names}; install it "
                    f"with `apt-get install dataset-fashion-mnist`, set data.garments.root to a folder holding "
                    f"the four files, or set data.garments.download: true")


def read_idx(path: Path) -> np.ndarray:
    """One idx file (``.gz`` or raw) as a uint8 array; a wrong magic number or size is a DataError naming it."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header promises shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(paths: tuple[tuple[str, Path], ...]) -> FashionMNIST:
    arrays, digest = {}, hashlib.sha256()
    for key, path in paths:
        arrays[key] = read_idx(path)
        digest.update(arrays[key].tobytes())
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
            raise DataError(f"Fashion-MNIST {part} files {dict(paths)[f'{part}_images']} and "
                            f"{dict(paths)[f'{part}_labels']} do not match: images {images.shape}, labels "
                            f"{labels.shape}")
        if labels.max() > 9:
            raise DataError(f"{dict(paths)[f'{part}_labels']}: label {int(labels.max())} is outside 0..9")
    return FashionMNIST(**arrays, digest=digest.hexdigest()[:16])


def load_fashion_mnist(paths: dict[str, Path]) -> FashionMNIST:
    """The four arrays of :func:`find_fashion_mnist`'s files (memoised per process)."""
    return _load_fashion_mnist(tuple(sorted(paths.items())))


# ------------------------------------------------------------------------------------------------ backgrounds
@functools.lru_cache(maxsize=1)
def backgrounds() -> tuple[np.ndarray, ...]:
    """The :data:`BACKGROUNDS` as RGB uint8, short side at most 512 (crops are far smaller than that)."""
    from hafis.extras import require

    skimage_data = require("skimage.data", "demo", "data.dataset=garments (its background photographs)")

    images = []
    for name in BACKGROUNDS:
        image = np.asarray(getattr(skimage_data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
        scale = 512 / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        images.append(np.asarray(image))
    return tuple(images)


def _background(rng: np.random.Generator, size: int, jitter: float) -> np.ndarray:
    """A random square crop (a quarter to all of the short side) of a random background, flipped, colour-jittered."""
    source = backgrounds()[rng.integers(len(BACKGROUNDS))]
    h, w = source.shape[:2]
    side = max(8, int(round(rng.uniform(0.25, 1.0) * min(h, w))))
    y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(source[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BILINEAR)
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    gain = rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32)
    return image * gain


# ----------------------------------------------------------------------------------------------------- render
class GarmentLayers(NamedTuple):
    """A rendered image before it becomes a :class:`Sample`, with what made it (for tests and pictures).

    image: ``(H, W, 3)`` uint8. instances: ``(H, W)`` uint8, 0 = background, ``k`` = the k-th pasted garment where
    it is opaque and on top. instance_classes: ``(n,)`` fine class id of garment ``k`` at ``k - 1``. background:
    ``(H, W, 3)`` uint8, the image before any garment. alphas: ``(n, H, W)`` float32 opacity of each garment in
    image coordinates (1 = opaque and labelled). sources: ``(n,)`` index of each garment in its Fashion-MNIST part.
    """

    image: np.ndarray
    instances: np.ndarray
    instance_classes: np.ndarray
    background: np.ndarray
    alphas: np.ndarray
    sources: np.ndarray


def render_garments(
    rng: np.random.Generator,
    garments: np.ndarray,
    labels: np.ndarray,
    *,
    image_size: int = 96,
    objects: tuple[int, int] = (1, 3),
    scale: tuple[float, float] = (0.3, 0.6),
    background_jitter: float = 0.2,
) -> GarmentLayers:
    """One image: a background crop, then garments drawn from ``garments`` / ``labels`` pasted in turn."""
    size = image_size
    image = _background(rng, size, background_jitter)
    background = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    image = background.astype(np.float32)
    n = int(rng.integers(objects[0], objects[1] + 1))
    sources = rng.integers(0, len(garments), n)
    instances = np.zeros((size, size), np.uint8)
    alphas = np.zeros((n, size, size), np.float32)
    for k, src in enumerate(sources, start=1):
        side = max(2, int(round(rng.uniform(*scale) * size)))
        grey = Image.fromarray(garments[src].astype(np.float32) / 255, mode="F").resize((side, side), Image.BILINEAR)
        g = np.clip(np.asarray(grey), 0, 1)
        if rng.random() < 0.5:
            g = g[:, ::-1]
        # at most a quarter of the garment outside each edge: truncated, as objects in photos are
        top, left = (rng.integers(-side // 4, size - side + side // 4 + 1, 2) if size >= side
                     else rng.integers(size - side, 1, 2))
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, size), min(left + side, size)
        g = g[y0 - top:y1 - top, x0 - left:x1 - left]
        alpha = np.clip(g / ALPHA_THRESHOLD, 0, 1)
        # tint: a random colour times the garment's own shading (its intensity relative to its brightest pixel)
        tint = rng.uniform(0.15, 1.0, 3).astype(np.float32) * 255
        shade = 0.3 + 0.7 * g / max(float(g.max()), ALPHA_THRESHOLD)
        colour = shade[..., None] * tint
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = region + alpha[..., None] * (colour - region)
        instances[y0:y1, x0:x1][alpha >= 1] = k  # later garments occlude earlier ones
        alphas[k - 1, y0:y1, x0:x1] = alpha
    classes = labels[sources].astype(np.int64) + 1
    return GarmentLayers(np.clip(image + 0.5, 0, 255).astype(np.uint8), instances, classes, background, alphas,
                         sources)


def layers_to_garment_sample(layers: GarmentLayers, sample_id: str = "") -> Sample:
    """The fine-class sample: 255 band on every garment boundary, a tight box per visible garment."""
    return layers_to_sample(SceneLayers(layers.image, layers.instances, layers.instance_classes), sample_id,
                            MIN_VISIBLE_AREA)


# ------------------------------------------------------------------------------------------------------ source


class _Part:
    """One generated part (``train`` pool or ``val``), in fine classes; generated or read from the cache once."""

    def __init__(self, config: GarmentsConfig, part: str, cache_dir: Union[str, os.PathLike, None, Literal[False]]):
        self.config, self.part = config, part
        self.count = config.num_train if part == "train" else config.num_val
        self.paths = find_fashion_mnist(config, None if cache_dir is False else cache_dir)
        self.cache_dir = None if cache_dir is False else _cache_base(cache_dir) / "garments"
        self._arrays: Optional[dict[str, np.ndarray]] = None

    def _cache_path(self, digest: str) -> Path:
        key = dict(self.config.render_kwargs(), seed=self.config.seed, part=self.part, count=self.count,
                   version=FORMAT_VERSION, fashion_mnist=digest, backgrounds=BACKGROUNDS)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"garments_v{FORMAT_VERSION}_{self.part}_{name}.npz"

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            data = load_fashion_mnist(self.paths)
            path = None if self.cache_dir is None else self._cache_path(data.digest)
            arrays = read_cache(path, self.count, self.config.image_size, "garments") if path is not None else None
            if arrays is None:
                arrays = self.generate(data)
                if path is not None:
                    write_cache(path, arrays, "garments")
            self._arrays = arrays
        return self._arrays

    def render(self, index: int, data: FashionMNIST) -> GarmentLayers:
        images, labels = ((data.train_images, data.train_labels) if self.part == "train"
                          else (data.test_images, data.test_labels))
        rng = np.random.default_rng([self.config.seed, PARTS[self.part], index])
        return render_garments(rng, images, labels, **self.config.render_kwargs())

    def generate(self, data: FashionMNIST) -> dict[str, np.ndarray]:
        samples = (layers_to_garment_sample(self.render(i, data)) for i in range(self.count))
        return stack_samples(samples, self.count, self.config.image_size)

def split_indices(config: GarmentsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices of the labelled and unlabelled splits, each sorted: the first ``num_labelled`` of one seeded
    permutation, then the next ``num_unlabelled`` (all the rest when null). The labelled split depends on the split
    seed, the pool size and ``num_labelled`` only, never on the run's seed."""
    seed = config.seed if config.split_seed is None else config.split_seed
    perm = np.random.default_rng([seed, 2]).permutation(config.num_train)
    end = None if config.num_unlabelled is None else config.num_labelled + config.num_unlabelled
    return np.sort(perm[:config.num_labelled]), np.sort(perm[config.num_labelled:end])


class GarmentScenes(SegmentationSource):
    """One split (``labelled``, ``unlabelled``, ``val``) of the garments dataset.

    ``cache_dir=None`` caches under ``$HAFIS_CACHE`` (else ``~/.cache/hafis``) in ``garments/``; ``False`` keeps the
    generated data in memory only. Ids are ``train_NNNNNN`` (pool
    index) and ``val_NNNNNN``. The unlabelled split also returns its mask so pseudo-label accuracy can be measured;
    training must not use it. ``part`` shares one generated pool between the labelled and unlabelled splits.
    """

    def __init__(self, config: GarmentsConfig, split: str,
                 cache_dir: Union[str, os.PathLike, None, Literal[False]] = None, part: Optional[_Part] = None):
        if split not in ("labelled", "unlabelled", "val"):
            raise ValueError(f"unknown garments split {split!r}; expected labelled, unlabelled or val")
        self.config, self.split = config, split
        self._part = part if part is not None else _Part(config, "val" if split == "val" else "train", cache_dir)
        if split == "val":
            self.indices = np.arange(config.num_val)
        else:
            labelled, unlabelled = split_indices(config)
            self.indices = labelled if split == "labelled" else unlabelled
        self.class_names: Sequence[str] = config.class_names
        self.thing_classes: Sequence[int] = tuple(range(1, len(self.class_names)))
        prefix = self._part.part
        self._ids = tuple(f"{prefix}_{i:06d}" for i in self.indices)
        fine = np.arange(256, dtype=np.uint8)  # masks / boxes are stored in fine classes; 255 stays 255
        if config.classes == "coarse":
            fine[:len(_FINE_TO_COARSE)] = _FINE_TO_COARSE
        self._lut = fine

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def __repr__(self) -> str:
        c = self.config
        return (f"GarmentScenes({self.split}: {len(self)} images; num_train={c.num_train}, "
                f"num_labelled={c.num_labelled}, num_val={c.num_val})")

    def load(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for the {n} samples of split {self.split!r}")
        index %= n
        a = self._part.arrays()
        i = int(self.indices[index])
        lo, hi = a["box_offsets"][i], a["box_offsets"][i + 1]
        return Sample(image=a["images"][i].copy(), mask=self._lut[a["masks"][i]], id=self._ids[index],
                      boxes=a["boxes"][lo:hi].copy(), box_labels=self._lut[a["box_labels"][lo:hi]].astype(np.int64))


def garment_splits(config: GarmentsConfig, cache_dir: Union[str, os.PathLike, None, Literal[False]] = None
                   ) -> tuple[GarmentScenes, GarmentScenes, GarmentScenes]:
    """``(labelled, unlabelled, val)``; the labelled and unlabelled splits share one generated pool."""
    pool = _Part(config, "train", cache_dir)
    val = _Part(config, "val", cache_dir)
    return (GarmentScenes(config, "labelled", part=pool), GarmentScenes(config, "unlabelled", part=pool),
            GarmentScenes(config, "val", part=val))
