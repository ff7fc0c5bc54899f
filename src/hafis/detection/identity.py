"""What makes a trained detector and its detections the same: one definition, read by the recipe check of
``hafis detect`` (a ``detector.pt`` trained with another recipe is retrained), by the detection cache's name, and by
``hafis compare`` (arms with the same :func:`detector_identity` share one detector folder).

Every ``detector.*`` key is in exactly one of :data:`TRAINING_KEYS` (the trained network depends on it),
:data:`INFERENCE_KEYS` (only the detections do: two arms that differ there share the detector and keep one cache
file each) and :data:`PLACEMENT_KEYS` (which file, where, in what batches: neither changes).
``component_classes`` is a training key under ``boxes: combined`` and unused otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from hafis.config import Config, to_dict
from hafis.data.base import SegmentationSource

__all__ = ["NOT_DATA_IDENTITY", "TRAINING_KEYS", "INFERENCE_KEYS", "PLACEMENT_KEYS", "data_identity",
           "detector_identity", "detector_key", "inference_identity", "training_recipe", "file_digest", "split_key"]

#: data keys that change augmentation or loading only, not the images: they change neither detector nor detections
NOT_DATA_IDENTITY = ("crop_size", "scale_range", "num_workers", "cache_dir")
#: the detector keys a trained detector depends on (with the images, the seed and, under ``boxes: combined``,
#: ``component_classes``)
TRAINING_KEYS = ("arch", "iterations", "batch_size", "lr", "weight_decay", "boxes", "component_min_area", "min_size",
                 "max_size", "backbone_weights")
#: the detector keys only its detections depend on (the detection cache's split key holds them)
INFERENCE_KEYS = ("score_threshold", "detections_per_image")
#: the detector keys that change neither: a given checkpoint (its identity is the file), where files go, batching
PLACEMENT_KEYS = ("checkpoint", "output_dir", "inference_batch_size", "chunk_size")


def _data(config: Config) -> dict:
    return {k: v for k, v in to_dict(config.data).items() if k not in NOT_DATA_IDENTITY}


def detector_identity(config: Config) -> dict:
    """What a detector trained from ``config`` depends on, from the config alone: the data keys that pick the images,
    the training keys of the recipe, the seed; and ``detector.checkpoint`` when one is given."""
    d = config.detector
    detector = {k: getattr(d, k) for k in TRAINING_KEYS}
    if d.boxes == "combined":
        detector["component_classes"] = list(d.component_classes)
    return {"data": _data(config), "detector": detector, "seed": config.seed,
            **({"checkpoint": d.checkpoint} if d.checkpoint is not None else {})}


def detector_key(config: Config) -> str:
    """:func:`detector_identity` hashed (12 hex digits): the folder name of a detector shared by ``hafis compare``."""
    text = json.dumps(detector_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def inference_identity(config: Config) -> dict:
    """The settings of a detector's inference that its stored detections depend on."""
    return {k: getattr(config.detector, k) for k in INFERENCE_KEYS}


def data_identity(config: Config, source: SegmentationSource, split: str) -> dict:
    """What identifies the images of a split: dataset keys (not augmentation), split name, classes."""
    return {"data": _data(config), "split": split, "classes": list(source.class_names),
            "thing_classes": [int(c) for c in source.thing_classes]}


def _sizes(config: Config, labelled: SegmentationSource) -> tuple[int, int]:
    d = config.detector
    if d.min_size is not None:
        return d.min_size, d.max_size if d.max_size is not None else max(d.min_size, 1333)
    h, w = labelled.load(0).image.shape[:2]
    return min(h, w), d.max_size if d.max_size is not None else max(h, w)


def training_recipe(config: Config, labelled: SegmentationSource) -> dict:
    """The recipe stored in ``detector.pt``: :func:`detector_identity`'s detector keys with torchvision's resize
    resolved, the seed and the labelled images' :func:`split_key`; a checkpoint with another recipe is retrained."""
    recipe = detector_identity(config)["detector"]
    recipe["min_size"], recipe["max_size"] = _sizes(config, labelled)
    return {**recipe, "seed": config.seed,
            "labelled": split_key(labelled.ids, data_identity(config, labelled, "labelled"))}


def file_digest(path: os.PathLike | str) -> str:
    """SHA-256 hex digest of a file's bytes (the detector checkpoint's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_key(ids: Sequence[str], identity: dict) -> str:
    """SHA-256 of a split's image ids and of ``identity`` (dataset keys, inference settings), as hex."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update("\n".join(ids).encode())
    return h.hexdigest()
