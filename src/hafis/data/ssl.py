"""The labelled, unlabelled and validation streams of semi-supervised training.

Samplers yield ``(epoch, index)`` pairs and each sample's augmentation is drawn from a generator seeded by
``(seed, stream, epoch, index)``. So the data order and every augmentation are fixed by the seed alone (not by the
worker count), and resuming at iteration ``t`` replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Callable, Iterator, NotRequired, Optional, TypedDict

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .base import IGNORE_INDEX, SegmentationSource, load_checked
from .transforms import PIL_GEOMETRY, Geometry, cutmix_box, normalize, strong_colour, to_tensor_image, weak_geometry

LABELLED_STREAM, UNLABELLED_STREAM, MIX_STREAM = 1, 2, 3


class LabelledBatch(TypedDict):
    """A labelled batch as a framework's ``train_step`` receives it, on the run's device (``B`` crops of ``c`` px;
    one :class:`LabelledDataset` item is the same without the batch dimension)."""

    #: ``(B, 3, c, c)`` float, normalised
    image: Tensor
    #: ``(B, c, c)`` long class indices, 255 = ignored (padding, unlabelled pixels)
    mask: Tensor
    #: ``(B,)`` the images' indices in the labelled source
    index: Tensor


class UnlabelledBatch(TypedDict):
    """An unlabelled batch as a framework's ``train_step`` receives it: views of the same ``B`` images, aligned
    pixel for pixel (one :class:`UnlabelledDataset` item is the same without the batch dimension). It carries no
    ground truth: reports that measure pseudo-labels read it from the source (:mod:`hafis.engine.diagnostics`)."""

    #: ``(B, 3, c, c)`` float, normalised: the weak view (geometry only) and two strong views (colour on top of it;
    #: absent, like the boxes, for a framework whose ``Traits.strong_views`` is False)
    weak: Tensor
    strong1: NotRequired[Tensor]
    strong2: NotRequired[Tensor]
    #: ``(B, c, c)`` long: 255 on padding, else 0
    ignore: Tensor
    #: ``(B, c, c)`` bool CutMix boxes of the strong views (``Traits.cutmix_prob``; all False when not drawn)
    box1: NotRequired[Tensor]
    box2: NotRequired[Tensor]
    #: ``(B,)`` the images' indices in the unlabelled source
    index: Tensor
    #: ``(B, C, c, c)`` bool per-class detection box masks (``weighting.reliable: detector``), aligned with the views
    box_mask: NotRequired[Tensor]
    #: the second batch of ``Traits.mix_batch`` (UniMatch's mixed-in images), with the same keys
    mix: NotRequired["UnlabelledBatch"]


class InfiniteSampler(Sampler):
    """An endless seeded shuffle: epoch ``e`` is ``randperm(n)`` from generator ``seed + e``.

    ``start`` skips that many samples (to resume); ``rank``/``world_size`` give every rank a disjoint share of each
    global batch, as ``DistributedSampler`` does.
    """

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for i in range(offset, self.n):
                if (position - self.start) % self.world_size == self.rank:
                    yield epoch, perm[i]
                position += 1


def sample_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, epoch, index])


def _mask_tensor(mask: Optional[np.ndarray], shape: tuple[int, int]) -> torch.Tensor:
    if mask is None:
        return torch.full(shape, IGNORE_INDEX, dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(mask))


class LabelledDataset(Dataset):
    """Weakly augmented labelled crops: ``image (3, c, c)`` float, ``mask (c, c)`` long; ``geometry`` is the
    framework's (:class:`~hafis.data.transforms.Geometry`)."""

    def __init__(self, source: SegmentationSource, crop_size: int, scale_range: tuple[float, float], seed: int,
                 geometry: Geometry = PIL_GEOMETRY):
        self.source, self.crop_size, self.scale_range, self.seed = source, crop_size, scale_range, seed
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        sample = load_checked(self.source, index)
        if sample.mask is None:
            raise ValueError(f"labelled image {sample.id!r} has no mask")
        rng = sample_rng(self.seed, LABELLED_STREAM, epoch, index)
        image, (mask,) = weak_geometry(to_tensor_image(sample.image), [(_mask_tensor(sample.mask, (0, 0)), 255)],
                                       self.crop_size, self.scale_range, rng, self.geometry)
        return {"image": normalize(image), "mask": mask.long(), "index": index}


class UnlabelledDataset(Dataset):
    """UniMatch-style unlabelled views of one image.

    ``weak``, ``strong1``, ``strong2``: ``(3, c, c)`` float; ``ignore``: 255 on padding, else 0; ``box1``/``box2``:
    CutMix boxes (:class:`UnlabelledBatch`); no ground truth.
    ``box_masks``: optional ``(index, (H, W)) -> (C, H, W)`` uint8 per-class detection box mask of an image (e.g. a
    :class:`hafis.detection.cache.BoxMaskProvider`); it goes through the same geometry as the pixels (nearest,
    padding 0) and comes out as ``box_mask`` ``(C, c, c)`` bool. It draws no random numbers, so the views are the
    same with and without it. ``geometry``: the framework's (:class:`~hafis.data.transforms.Geometry`).
    ``strong_views``: False leaves out the strong views and their boxes (a recipe that reads the weak view only).
    ``stream``: the id that seeds the augmentations (a second stream over the same images, such as UniMatch's mixing
    batch, passes :data:`MIX_STREAM` so its views are drawn independently).
    """

    def __init__(self, source: SegmentationSource, crop_size: int, scale_range: tuple[float, float], seed: int,
                 cutmix_prob: float = 0.5, box_masks: Optional[Callable[[int, tuple[int, int]], torch.Tensor]] = None,
                 stream: int = UNLABELLED_STREAM, geometry: Geometry = PIL_GEOMETRY, strong_views: bool = True):
        self.source, self.crop_size, self.scale_range, self.seed = source, crop_size, scale_range, seed
        self.geometry, self.strong_views = geometry, strong_views
        self.cutmix_prob = cutmix_prob
        self.box_masks = box_masks
        self.stream = stream

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        sample = load_checked(self.source, index)
        rng = sample_rng(self.seed, self.stream, epoch, index)
        h, w = sample.image.shape[:2]
        ignore = torch.zeros(h, w, dtype=torch.uint8)
        maps = [(ignore, 255)]
        if self.box_masks is not None:
            maps.append((self.box_masks(index, (h, w)), 0))
        weak, (ignore, *box_mask) = weak_geometry(to_tensor_image(sample.image), maps, self.crop_size,
                                                  self.scale_range, rng, self.geometry)
        out = {"weak": normalize(weak), "ignore": ignore.long(), "index": index}
        if self.strong_views:  # drawn after the geometry: the weak view is the same without them
            strong1 = strong_colour(weak, rng)
            box1 = cutmix_box(self.crop_size, rng, self.cutmix_prob)
            strong2 = strong_colour(weak, rng)
            box2 = cutmix_box(self.crop_size, rng, self.cutmix_prob)
            out.update(strong1=normalize(strong1), strong2=normalize(strong2), box1=box1.bool(), box2=box2.bool())
        if box_mask:
            out["box_mask"] = box_mask[0].bool()
        return out


class EvalDataset(Dataset):
    """Whole validation images, normalised, with their masks."""

    def __init__(self, source: SegmentationSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = load_checked(self.source, index)
        if sample.mask is None:
            raise ValueError(f"validation image {sample.id!r} has no mask")
        return {"image": normalize(to_tensor_image(sample.image)), "mask": torch.from_numpy(
            np.ascontiguousarray(sample.mask)).long(), "index": index}
