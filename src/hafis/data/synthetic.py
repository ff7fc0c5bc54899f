"""Built-in synthetic scenes: the project's embedded default dataset, generated procedurally, no download needed.

Each image shows a smooth, noisy background with 1-5 objects of up to five classes (disc, square, triangle, ring,
cross). Classes differ by shape and by a *preferred* colour and texture, but colours and textures overlap between
classes (and with the background) on purpose: a small network trained on few labels then gets a real share of pixels
wrong, which is what makes pseudo-label weighting measurable. Masks carry 255 (ignore) on a thin band around every
object boundary, as Pascal VOC does, and every kept object has a tight box of its visible pixels, so the detector can
be trained on the same data.

Generation is fully vectorised numpy (coordinate grids and half-plane / distance tests, one small crop per object)
and deterministic: sample ``i`` of a split comes from ``np.random.default_rng([seed, split_code, i])``, so it does not
depend on any other sample or on how many are generated. A whole split is generated once and cached as one ``.npz``.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Sequence, Union

import numpy as np

from hafis.data.base import IGNORE_INDEX, Sample, SegmentationSource
from hafis.data.scene_cache import read_cache, stack_samples, write_cache
from hafis.fields import bounded, nonneg, positive, seed_value, unit

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "FORMAT_VERSION",
    "SyntheticConfig",
    "SceneLayers",
    "sample_rng",
    "render_scene",
    "boundary_band",
    "layers_to_sample",
    "generate_scene",
    "SyntheticScenes",
    "default_cache_dir",
]

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "cross")
#: split name -> code mixed into the seed, so the splits are different images.
SPLITS = {"labelled": 0, "unlabelled": 1, "val": 2}
#: bump whenever the generator's output changes, so stale caches are never read.
FORMAT_VERSION = 1
#: a split is generated and held in memory as one array: a million 128 px images are already 49 GB
MAX_SPLIT_SIZE = 1_000_000

SHAPES = CLASS_NAMES[1:]
TEXTURES = ("flat", "stripes", "checker", "noise", "dots")
#: preferred texture of each object class (index = class id - 1); used with probability ``texture_preference``.
_PREFERRED_TEXTURE = ("stripes", "checker", "noise", "flat", "dots")
#: farthest point of each shape from its centre, in radii: bounds the crop each object is rasterised in.
_EXTENT = {"disc": 1.0, "square": 0.8 * np.sqrt(2), "triangle": 1.3, "ring": 1.0, "cross": 1.0}


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the generated data (it is all hashed into the cache file name).

    image_size: side of the square images; 128 for the demo, 32-64 in tests.
    num_object_classes: 1..5 object classes (plus background); fewer classes make an easier task.
    num_labelled / num_unlabelled / num_val: sizes of the three splits.
    seed: base seed; the split and the sample index are mixed in, see :func:`sample_rng`.
    min_objects / max_objects: objects per image (uniform); several objects give occlusion and context.
    min_radius / max_radius: object radius as a fraction of ``image_size``; the scale variation a real set has.
    hue_jitter: std of the per-object hue around its class hue (hues are 0.2 apart); large enough that neighbouring
        classes' colours overlap, so colour alone does not give the class.
    texture_preference: probability that an object uses its class's preferred texture, else a random one; below 1 so
        texture is only a hint.
    noise_std: std of the additive Gaussian pixel noise (0-255 scale); hides fine texture, as sensor noise does.
    blur_prob: probability that an image is blurred with a 3x3 binomial kernel; softens edges like a real camera.
    min_visible_area: an object with fewer visible (non-ignore) pixels after occlusion gets no box and its pixels
        become ignore: a few pixels are not a labelable object.
    """

    image_size: int = bounded(128, 16, 4096)
    num_object_classes: int = bounded(5, 1, len(SHAPES))
    num_labelled: int = bounded(300, 0, MAX_SPLIT_SIZE)
    num_unlabelled: int = bounded(2000, 0, MAX_SPLIT_SIZE)
    num_val: int = bounded(300, 0, MAX_SPLIT_SIZE)
    seed: int = seed_value(0)
    min_objects: int = bounded(1, 1, 254)
    max_objects: int = bounded(5, 1, 254, at_least="data.synthetic.min_objects")
    min_radius: float = positive(0.08)
    max_radius: float = positive(0.30, at_least="data.synthetic.min_radius")
    hue_jitter: float = nonneg(0.10)
    texture_preference: float = unit(0.45)
    noise_std: float = nonneg(12.0)
    blur_prob: float = unit(0.3)
    min_visible_area: int = nonneg(12, 4096 * 4096)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.num_object_classes <= len(SHAPES):
            raise ValueError(f"num_object_classes must be in 1..{len(SHAPES)}, got {self.num_object_classes}")
        for name in ("num_labelled", "num_unlabelled", "num_val", "seed", "min_visible_area"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_objects <= self.max_objects <= 254:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 254, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_radius <= self.max_radius:
            raise ValueError(f"need 0 < min_radius <= max_radius, got {self.min_radius}, {self.max_radius}")

    def split_size(self, split: str) -> int:
        return {"labelled": self.num_labelled, "unlabelled": self.num_unlabelled, "val": self.num_val}[split]

    def scene_kwargs(self) -> dict:
        """The keyword arguments of :func:`generate_scene` that this config sets."""
        return {
            "image_size": self.image_size,
            "num_object_classes": self.num_object_classes,
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "min_radius": self.min_radius,
            "max_radius": self.max_radius,
            "hue_jitter": self.hue_jitter,
            "texture_preference": self.texture_preference,
            "noise_std": self.noise_std,
            "blur_prob": self.blur_prob,
            "min_visible_area": self.min_visible_area,
        }


class SceneLayers(NamedTuple):
    """A rendered scene before it is turned into a :class:`Sample`.

    image: ``(H, W, 3)`` uint8. instances: ``(H, W)`` uint8, 0 = background, ``k`` = the k-th drawn object (later
    objects overwrite earlier ones, so this is the visible instance of each pixel). instance_classes: ``(n,)`` int64
    class id of object ``k`` at index ``k - 1``.
    """

    image: np.ndarray
    instances: np.ndarray
    instance_classes: np.ndarray


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: independent of every other sample and of the split sizes."""
    return np.random.default_rng([seed, SPLITS[split], index])


def _hsv_to_rgb255(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32) * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field: a random base colour plus a few low-frequency cosines per channel."""
    base = _hsv_to_rgb255(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.85))
    k = 4
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    basis = np.cos(np.pi * coords[:, None] * np.arange(k, dtype=np.float32)[None, :])  # (size, k)
    freq = np.arange(k, dtype=np.float32)
    decay = 1.0 / (1.0 + freq[:, None] + freq[None, :])
    coef = rng.normal(0.0, 30.0, (k, k, 3)).astype(np.float32) * decay[:, :, None]
    coef[0, 0] = 0.0
    field = np.einsum("yk,klc,xl->yxc", basis, coef, basis, optimize=True)
    return field + base


def _texture(rng: np.random.Generator, kind: str, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """A pattern in [0, 1] over a crop (``dy`` column / ``dx`` row offsets), at a random period and orientation."""
    period = rng.uniform(3.0, 10.0)
    phi = rng.uniform(0.0, np.pi)
    a = np.cos(phi) * dx + np.sin(phi) * dy
    b = -np.sin(phi) * dx + np.cos(phi) * dy
    w = 2 * np.pi / period
    if kind == "flat":
        return np.zeros(np.broadcast_shapes(dy.shape, dx.shape), np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(w * a)
    if kind == "checker":
        return (np.sin(w * a) * np.sin(w * b) > 0).astype(np.float32)
    if kind == "dots":
        pa, pb = np.mod(a, period) - period / 2, np.mod(b, period) - period / 2
        return (pa * pa + pb * pb < (0.3 * period) ** 2).astype(np.float32)
    if kind == "noise":  # blocky random field: blocks of about half a period
        block = max(1, int(period / 2))
        h, w_ = dy.shape[0], dx.shape[1]
        grid = rng.random((h // block + 1, w_ // block + 1), dtype=np.float32)
        return grid[(np.arange(h) // block)[:, None], (np.arange(w_) // block)[None, :]]
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside test of one shape of radius ``r`` in its own rotated coordinates ``(u, v)``."""
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "triangle":  # equilateral, circumradius 1.3 r (about a disc's area): three half-planes at 0.65 r
        inside = v >= -0.65 * r
        for angle in (np.pi / 6, 5 * np.pi / 6):
            inside &= np.cos(angle) * u + np.sin(angle) * v <= 0.65 * r
        return inside
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = 0.28 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= r)) | ((av <= arm) & (au <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable 3x3 binomial blur with edge padding."""
    p = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    image = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
    p = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25


def render_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    num_object_classes: int = 5,
    *,
    min_objects: int = 1,
    max_objects: int = 5,
    min_radius: float = 0.08,
    max_radius: float = 0.30,
    hue_jitter: float = 0.10,
    texture_preference: float = 0.45,
    noise_std: float = 12.0,
    blur_prob: float = 0.3,
) -> SceneLayers:
    """Draw one scene: the image and the visible-instance map kept while drawing (see :class:`SyntheticConfig`)."""
    size = image_size
    image = _background(rng, size)
    instances = np.zeros((size, size), np.uint8)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    classes = rng.integers(1, num_object_classes + 1, n_objects)
    for k, cls in enumerate(classes, start=1):
        shape = SHAPES[cls - 1]
        r = rng.uniform(min_radius, max_radius) * size
        cy, cx = rng.uniform(0, size, 2)
        theta = rng.uniform(0, 2 * np.pi)
        half = _EXTENT[shape] * r + 1
        y0, y1 = max(0, int(cy - half)), min(size, int(np.ceil(cy + half)))
        x0, x1 = max(0, int(cx - half)), min(size, int(np.ceil(cx + half)))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dy = yy.astype(np.float32) + 0.5 - np.float32(cy)
        dx = xx.astype(np.float32) + 0.5 - np.float32(cx)
        c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        inside = _shape_mask(shape, c * dx + s * dy, -s * dx + c * dy, r)

        # colour: class hue (0.2 apart) + jitter; a second colour nearby in hue for the texture; linear shading.
        hue = (cls - 1) / len(SHAPES) + rng.normal(0.0, hue_jitter)
        sat, val = rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95)
        base = _hsv_to_rgb255(hue, sat, val)
        alt = _hsv_to_rgb255(hue + rng.uniform(-0.15, 0.15), sat + rng.uniform(-0.3, 0.3), val - rng.uniform(0.15, 0.4))
        kind = _PREFERRED_TEXTURE[cls - 1] if rng.random() < texture_preference else TEXTURES[rng.integers(5)]
        pattern = _texture(rng, kind, dy, dx)
        gy, gx = rng.normal(0.0, 0.15, 2)
        shade = 1.0 + (gy * dy + gx * dx) / r
        pixels = (base + pattern[..., None] * (alt - base)) * shade[..., None]

        image[y0:y1, x0:x1][inside] = pixels[inside]  # drawn over earlier objects: occlusion
        instances[y0:y1, x0:x1][inside] = k

    if rng.random() < blur_prob:
        image = _blur(image)
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_std)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return SceneLayers(image, instances, classes.astype(np.int64))


def boundary_band(instances: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another instance: a 2 px band straddling every boundary (1 px on each side)."""
    band = np.zeros(instances.shape, bool)
    horizontal = instances[:, 1:] != instances[:, :-1]
    vertical = instances[1:, :] != instances[:-1, :]
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    band[1:, :] |= vertical
    band[:-1, :] |= vertical
    return band


def layers_to_sample(layers: SceneLayers, sample_id: str = "", min_visible_area: int = 12) -> Sample:
    """Semantic mask (ignore band on boundaries) and tight boxes of each object's visible, non-ignore pixels."""
    instances = layers.instances
    lut = np.concatenate([[0], layers.instance_classes]).astype(np.uint8)
    mask = lut[instances]
    band = boundary_band(instances)
    mask[band] = IGNORE_INDEX
    labelled = np.where(band, 0, instances)
    area = np.bincount(labelled.ravel(), minlength=len(lut))
    boxes, box_labels = [], []
    for k in range(1, len(lut)):  # a loop over objects (at most a handful), not over pixels
        if area[k] < min_visible_area:  # fully occluded, or too few pixels to be a labelable object
            mask[instances == k] = IGNORE_INDEX
            continue
        visible = labelled == k
        rows = np.flatnonzero(visible.any(axis=1))
        cols = np.flatnonzero(visible.any(axis=0))
        boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
        box_labels.append(lut[k])
    return Sample(
        image=layers.image,
        mask=mask,
        id=sample_id,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_labels=np.asarray(box_labels, np.int64),
    )


def generate_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    num_object_classes: int = 5,
    *,
    sample_id: str = "",
    min_visible_area: int = 12,
    **render_kwargs,
) -> Sample:
    """One synthetic sample: :func:`render_scene` then :func:`layers_to_sample` (keywords as in SyntheticConfig)."""
    layers = render_scene(rng, image_size, num_object_classes, **render_kwargs)
    return layers_to_sample(layers, sample_id, min_visible_area)


def default_cache_dir() -> Path:
    """``$HAFIS_CACHE/synthetic``, else ``~/.cache/hafis/synthetic``."""
    root = os.environ.get("HAFIS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hafis") / "synthetic"


class SyntheticScenes(SegmentationSource):
    """One split of the synthetic dataset, generated on first use and cached as one ``.npz``.

    ``cache_dir=None`` uses :func:`default_cache_dir`; ``cache_dir=False`` keeps the data in memory only. The
    unlabelled split also returns its mask so pseudo-label accuracy can be measured; training must not use it.
    """

    def __init__(
        self,
        config: SyntheticConfig,
        split: str,
        cache_dir: Union[str, os.PathLike, None, Literal[False]] = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SPLITS)}")
        self.config = config
        self.split = split
        self.class_names: Sequence[str] = CLASS_NAMES[: config.num_object_classes + 1]
        self.thing_classes: Sequence[int] = tuple(range(1, config.num_object_classes + 1))
        self._ids = tuple(f"{split}_{i:06d}" for i in range(config.split_size(split)))
        self.cache_path = None if cache_dir is False else (
            Path(default_cache_dir() if cache_dir is None else cache_dir) / self._cache_name()
        )
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.split}, {len(self)} images, seed={self.config.seed})"

    def load(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for the {n} samples of split {self.split!r}")
        index %= n
        a = self._data()
        lo, hi = a["box_offsets"][index], a["box_offsets"][index + 1]
        # copies: callers (augmentation) may modify the sample in place without corrupting the split
        return Sample(
            image=a["images"][index].copy(),
            mask=a["masks"][index].copy(),
            id=self._ids[index],
            boxes=a["boxes"][lo:hi].copy(),
            box_labels=a["box_labels"][lo:hi].copy(),
        )

    # -- generation and cache ---------------------------------------------------------------------------------

    def _cache_key(self) -> dict:
        key = self.config.scene_kwargs()
        key.update(seed=self.config.seed, split=self.split, count=len(self), version=FORMAT_VERSION)
        return key

    def _cache_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self._cache_key(), sort_keys=True).encode()).hexdigest()[:16]
        return f"synthetic_v{FORMAT_VERSION}_{self.split}_{digest}.npz"

    def _data(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = read_cache(self.cache_path, len(self), self.config.image_size, "synthetic") \
                if self.cache_path is not None else None
            if arrays is None:
                arrays = self.generate_arrays()
                if self.cache_path is not None:
                    write_cache(self.cache_path, arrays, "synthetic")
            self._arrays = arrays
        return self._arrays

    def generate_arrays(self) -> dict[str, np.ndarray]:
        """Generate the whole split (no cache) as stacked arrays; boxes are concatenated with per-sample offsets."""
        cfg = self.config
        kwargs = cfg.scene_kwargs()
        samples = (generate_scene(sample_rng(cfg.seed, self.split, i), **kwargs) for i in range(len(self)))
        return stack_samples(samples, len(self), cfg.image_size)
