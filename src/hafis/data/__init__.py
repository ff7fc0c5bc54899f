"""Datasets: readers (one per on-disk format), augmentations, and the SSL streams built on them."""

from __future__ import annotations

from typing import Callable

from .base import IGNORE_INDEX, Sample, SegmentationSource
from .splits import DATASETS as ON_DISK

Sources = tuple[SegmentationSource, SegmentationSource, SegmentationSource]


def _synthetic(data_config) -> Sources:
    from .synthetic import SyntheticScenes

    return tuple(SyntheticScenes(data_config.synthetic, split, cache_dir=data_config.cache_dir)
                 for split in ("labelled", "unlabelled", "val"))


def _garments(data_config) -> Sources:
    from .garments import garment_splits

    return garment_splits(data_config.garments, cache_dir=data_config.cache_dir)


def _on_disk(data_config) -> Sources:
    """A dataset tree on disk (voc, cityscapes, coco, ade20k, folder) and its split files."""
    from .layout import LayoutSource
    from .splits import make_layout, missing_images, split_ids

    layout = make_layout(data_config.dataset, data_config.root, voc_setting=data_config.voc_setting,
                         classes=data_config.classes, cache_dir=data_config.cache_dir)
    ids = split_ids(layout, data_config.labelled_split, data_config.unlabelled_split, data_config.val_split)
    parts = ("labelled", "unlabelled", "val")
    for part_ids, part in zip(ids, parts, strict=True):
        missing = missing_images(layout, part_ids, part)
        if missing:  # a split file naming images that are not there fails now, not hours into training
            raise FileNotFoundError(
                f"{len(missing)} {part} image(s) of the split are missing, e.g. {', '.join(missing[:5])} "
                f"(check data.root and the split files; `hafis prepare {layout.name} {layout.root}` checks "
                f"the tree)")
        if part != "unlabelled":  # COCO: rasterise missing masks once here, not in every loader worker
            layout.warm_cache(part_ids, part)
    return tuple(LayoutSource(layout, part_ids, part) for part_ids, part in zip(ids, parts, strict=True))


#: ``data.dataset`` -> the builder of its ``(labelled, unlabelled, val)`` readers; a new dataset is one entry
DATASETS: dict[str, Callable[..., Sources]] = {"synthetic": _synthetic, "garments": _garments,
                                               **dict.fromkeys(ON_DISK, _on_disk)}


def build_sources(data_config) -> Sources:
    """``(labelled, unlabelled, val)`` readers for ``data_config.dataset``."""
    if data_config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {data_config.dataset!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[data_config.dataset](data_config)


def class_names(data_config) -> tuple[str, ...]:
    """The class names of ``data_config.dataset`` without reading an image; ``()`` when they live in a tree that
    is not at hand (COCO's annotations, a folder's class list), for labelling predictions of new images."""
    from .base import DataError

    if data_config.dataset == "synthetic":
        from .synthetic import CLASS_NAMES

        return tuple(CLASS_NAMES[: data_config.synthetic.num_object_classes + 1])
    if data_config.dataset == "garments":
        return tuple(data_config.garments.class_names)
    from .splits import make_layout

    try:
        return tuple(make_layout(data_config.dataset, data_config.root, voc_setting=data_config.voc_setting,
                                 classes=data_config.classes, cache_dir=data_config.cache_dir).class_names)
    except (OSError, ValueError, DataError):
        return ()


__all__ = ["DATASETS", "IGNORE_INDEX", "Sample", "SegmentationSource", "build_sources", "class_names"]
