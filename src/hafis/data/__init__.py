"""Datasets: readers (one per on-disk format), augmentations, and the SSL streams built on them."""

from __future__ import annotations

from .base import IGNORE_INDEX, Sample, SegmentationSource


def build_sources(data_config) -> tuple[SegmentationSource, SegmentationSource, SegmentationSource]:
    """``(labelled, unlabelled, val)`` readers for ``data_config.dataset``."""
    if data_config.dataset == "synthetic":
        from .synthetic import SyntheticScenes

        return tuple(SyntheticScenes(data_config.synthetic, split, cache_dir=data_config.cache_dir) for split in ("labelled", "unlabelled", "val"))
    raise ValueError(f"unknown dataset {data_config.dataset!r}")


__all__ = ["IGNORE_INDEX", "Sample", "SegmentationSource", "build_sources"]
