"""Datasets: readers (one per on-disk format), augmentations, and the SSL streams built on them."""

from __future__ import annotations

from .base import IGNORE_INDEX, Sample, SegmentationSource


def build_sources(data_config) -> tuple[SegmentationSource, SegmentationSource, SegmentationSource]:
    """``(labelled, unlabelled, val)`` readers for ``data_config.dataset``."""
    if data_config.dataset == "synthetic":
        from .synthetic import SyntheticScenes

        return tuple(SyntheticScenes(data_config.synthetic, split, cache_dir=data_config.cache_dir)
                     for split in ("labelled", "unlabelled", "val"))
    if data_config.dataset == "garments":
        from .garments import garment_splits

        return garment_splits(data_config.garments, cache_dir=data_config.cache_dir)
    from .splits import DATASETS

    if data_config.dataset in DATASETS:  # real datasets on disk: voc, cityscapes, coco, folder
        from .layout import LayoutSource
        from .splits import make_layout, missing_images, split_ids

        layout = make_layout(data_config.dataset, data_config.root, voc_setting=data_config.voc_setting,
                             classes=data_config.classes, cache_dir=data_config.cache_dir)
        ids = split_ids(layout, data_config.labelled_split, data_config.unlabelled_split, data_config.val_split)
        parts = ("labelled", "unlabelled", "val")
        for part_ids, part in zip(ids, parts):
            missing = missing_images(layout, part_ids, part)
            if missing:  # a split file naming images that are not there fails now, not hours into training
                raise FileNotFoundError(
                    f"{len(missing)} {part} image(s) of the split are missing, e.g. {', '.join(missing[:5])} "
                    f"(check data.root and the split files; `hafis prepare {layout.name} {layout.root}` checks "
                    f"the tree)")
            if part != "unlabelled":  # COCO: rasterise missing masks once here, not in every loader worker
                layout.warm_cache(part_ids, part)
        return tuple(LayoutSource(layout, part_ids, part) for part_ids, part in zip(ids, parts))
    raise ValueError(f"unknown dataset {data_config.dataset!r}")


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


__all__ = ["IGNORE_INDEX", "Sample", "SegmentationSource", "build_sources", "class_names"]
