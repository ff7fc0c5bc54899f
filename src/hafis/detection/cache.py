"""The on-disk cache of detections over the unlabelled images, and the per-image box masks read from it.

One file per (image split, detector checkpoint): ``detections_<split>_<split key>_<checkpoint hash>.npz`` holds, for
every image of the split in order, its boxes (pixels, x1 / y1 exclusive), *segmentation* class labels and scores,
concatenated with per-image offsets, plus the image ids, image sizes and a JSON header (format version, checkpoint
hash, split key, image count, ``complete``). It is read once into memory and then indexed per image (no parsing per
step). The checkpoint hash is the SHA-256 of the detector checkpoint file, so a retrained detector never meets the
detections of the old one; the split key hashes the image ids, the dataset identity and the inference settings.

A cache that exists but does not pass :meth:`DetectionCache.check` (truncated or corrupt file, another checkpoint's
hash, other image ids, missing images, inconsistent offsets) is never used: :meth:`DetectionCache.load` raises
:class:`DetectionCacheError` with the reason, and :meth:`DetectionCache.load_or_build` reports the reason and
rebuilds it. Building is resumable: detections are written in chunks of images (each file atomic) under
``<cache>.partial/``, and a restarted build keeps every valid chunk; the final file is written atomically, then the
chunks are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from hafis.errors import UserError
from hafis.files import atomic_write, json_dumps
from hafis.weighting.reliable import box_mask_from_detections

__all__ = [
    "FORMAT_VERSION",
    "DetectionCacheError",
    "DetectionsMissingError",
    "Detections",
    "DetectionCache",
    "BoxMaskProvider",
    "box_quality",
]

FORMAT_VERSION = 1
_ARRAYS = ("boxes", "labels", "scores", "offsets", "sizes", "ids")

#: ``run(indices) -> [{"boxes", "labels", "scores", "size"}, ...]``: the detector over images of the split
RunFn = Callable[[Sequence[int]], list[dict]]


class DetectionCacheError(RuntimeError):
    """A detection cache file that exists but must not be used; the message says why."""


class DetectionsMissingError(UserError, FileNotFoundError):
    """Training needs detections that are not there (or are stale); the message says which command makes them."""


@dataclass
class Detections:
    """Every image's detections, concatenated: image ``i`` owns rows ``offsets[i]:offsets[i + 1]``."""

    ids: tuple[str, ...]
    boxes: np.ndarray  # (N, 4) float32, x0 y0 x1 y1, x1 / y1 exclusive
    labels: np.ndarray  # (N,) int64 segmentation class ids
    scores: np.ndarray  # (N,) float32
    offsets: np.ndarray  # (n + 1,) int64
    sizes: np.ndarray  # (n, 2) int64 image (H, W) the boxes refer to

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.boxes[lo:hi], self.labels[lo:hi], self.scores[lo:hi]

    @classmethod
    def concatenate(cls, ids: Sequence[str], per_image: Sequence[dict]) -> "Detections":
        counts = [len(d["scores"]) for d in per_image]
        offsets = np.zeros(len(per_image) + 1, np.int64)
        offsets[1:] = np.cumsum(counts)

        def cat(key, shape, dtype):
            parts = [np.asarray(d[key], dtype).reshape(shape) for d in per_image]
            return np.concatenate(parts) if parts else np.zeros((0,) + shape[1:], dtype)

        return cls(tuple(ids), cat("boxes", (-1, 4), np.float32), cat("labels", (-1,), np.int64),
                   cat("scores", (-1,), np.float32), offsets,
                   np.asarray([d["size"] for d in per_image], np.int64).reshape(-1, 2))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"boxes": self.boxes, "labels": self.labels, "scores": self.scores, "offsets": self.offsets,
                "sizes": self.sizes, "ids": np.asarray(self.ids, dtype=str)}

    def summary(self, score_threshold: float) -> dict:
        """Counts for logs: images, detections stored, detections ``>= score_threshold`` and images with one."""
        kept = self.scores >= score_threshold
        image_of = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        return {"images": len(self), "detections": int(len(self.scores)), "kept": int(kept.sum()),
                "images_with_kept": int(np.unique(image_of[kept]).size)}


def _check_arrays(arrays: dict, n: Optional[int] = None) -> None:
    """Shapes, dtypes and offsets of a detections file or chunk; raises :class:`DetectionCacheError`."""
    offsets = arrays["offsets"]
    count = len(offsets) - 1
    if offsets.dtype != np.int64 or offsets.ndim != 1 or count < 0:
        raise DetectionCacheError("per-image offsets are malformed")
    if n is not None and count != n:
        raise DetectionCacheError(f"holds {count} images, expected {n}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise DetectionCacheError("per-image offsets are not increasing from 0")
    total = int(offsets[-1])
    expected = {"boxes": ((total, 4), np.float32), "labels": ((total,), np.int64), "scores": ((total,), np.float32),
                "sizes": ((count, 2), np.int64)}
    for key, (shape, dtype) in expected.items():
        a = arrays[key]
        if a.shape != shape or a.dtype != dtype:
            raise DetectionCacheError(f"'{key}' is {a.shape} {a.dtype}, expected {shape} {np.dtype(dtype)}")
    if arrays["ids"].shape != (count,):
        raise DetectionCacheError(f"'ids' is {arrays['ids'].shape}, expected ({count},)")


def _write_npz_atomic(path: Path, arrays: dict, meta: dict) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees a half-written file under ``path``."""
    atomic_write(path, lambda fh: np.savez(fh, meta=np.asarray(json_dumps(meta, sort_keys=True)), **arrays))


def _read_npz(path: Path) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a file written by :func:`_write_npz_atomic`; raises :class:`DetectionCacheError`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in _ARRAYS}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DetectionCacheError(f"unreadable, truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return meta, arrays


class DetectionCache:
    """The detections of one image split by one detector checkpoint, in ``directory``.

    ``split``: a name for the file (``unlabelled``); ``key``: :func:`~.identity.split_key` of the split;
    ``checkpoint_hash``: :func:`~.identity.file_digest` of the detector checkpoint; ``ids``: the split's image ids in
    index order.
    """

    def __init__(self, directory: os.PathLike | str, split: str, key: str, checkpoint_hash: str,
                 ids: Sequence[str], chunk_size: int = 256) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.directory = Path(directory)
        self.split, self.key, self.checkpoint_hash = split, key, checkpoint_hash
        self.ids = tuple(ids)
        self.chunk_size = chunk_size
        self.path = self.directory / f"detections_{split}_{key[:12]}_{checkpoint_hash[:16]}.npz"
        self.partial_dir = self.path.with_name(self.path.stem + ".partial")

    # ----------------------------------------------------------------------------------------- reading
    def _meta(self, **extra) -> dict:
        return {"version": FORMAT_VERSION, "checkpoint_hash": self.checkpoint_hash, "split": self.split,
                "split_key": self.key, **extra}

    def check(self, meta: dict, arrays: dict) -> None:
        """Raise :class:`DetectionCacheError` unless the file is complete and belongs to this split and detector."""
        if meta.get("version") != FORMAT_VERSION:
            raise DetectionCacheError(f"format version {meta.get('version')}, expected {FORMAT_VERSION}")
        if meta.get("checkpoint_hash") != self.checkpoint_hash:
            raise DetectionCacheError(
                f"stale: made by detector checkpoint {str(meta.get('checkpoint_hash'))[:16]}, "
                f"not by the current one {self.checkpoint_hash[:16]}")
        if meta.get("split_key") != self.key:
            raise DetectionCacheError("made for other images or inference settings (split key differs)")
        if not meta.get("complete") or meta.get("count") != len(self.ids):
            raise DetectionCacheError(f"partial: {meta.get('count')} of {len(self.ids)} images")
        _check_arrays(arrays, len(self.ids))
        if tuple(arrays["ids"].tolist()) != self.ids:
            raise DetectionCacheError("its image ids differ from the split's")

    def load(self) -> Optional[Detections]:
        """The cached detections; ``None`` when there is no file; :class:`DetectionCacheError` when unusable."""
        if not self.path.is_file():
            return None
        meta, arrays = _read_npz(self.path)
        self.check(meta, arrays)
        return Detections(self.ids, arrays["boxes"], arrays["labels"], arrays["scores"], arrays["offsets"],
                          arrays["sizes"])

    def other_checkpoints(self) -> list[Path]:
        """Cache files of the same split made by other detector checkpoints (stale for this one)."""
        pattern = f"detections_{self.split}_{self.key[:12]}_*.npz"
        return sorted(p for p in self.directory.glob(pattern) if p != self.path)

    # ----------------------------------------------------------------------------------------- building
    def _chunk_path(self, start: int, stop: int) -> Path:
        return self.partial_dir / f"chunk_{start:08d}_{stop:08d}.npz"

    def _read_chunk(self, start: int, stop: int, log: Callable[[str], None]) -> Optional[list[dict]]:
        path = self._chunk_path(start, stop)
        if not path.is_file():
            return None
        try:
            meta, arrays = _read_npz(path)
            if meta != self._meta(start=start, stop=stop):
                raise DetectionCacheError("written for another checkpoint, split or chunk")
            _check_arrays(arrays, stop - start)
            if tuple(arrays["ids"].tolist()) != self.ids[start:stop]:
                raise DetectionCacheError("its image ids differ from the split's")
        except DetectionCacheError as exc:
            log(f"detections: partial chunk {path.name} is unusable ({exc}); recomputing it")
            path.unlink(missing_ok=True)
            return None
        o = arrays["offsets"]
        return [{"boxes": arrays["boxes"][o[i]:o[i + 1]], "labels": arrays["labels"][o[i]:o[i + 1]],
                 "scores": arrays["scores"][o[i]:o[i + 1]], "size": arrays["sizes"][i]} for i in range(stop - start)]

    def build(self, run: RunFn, batch_size: int = 8, progress: bool = True,
              log: Callable[[str], None] = print) -> Detections:
        """Run ``run`` over every image not yet in a valid chunk, then write the cache file atomically."""
        from tqdm import tqdm

        n = len(self.ids)
        chunks = [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]
        per_image: list[Optional[dict]] = [None] * n
        done = 0
        for start, stop in chunks:
            found = self._read_chunk(start, stop, log)
            if found is not None:
                per_image[start:stop] = found
                done += stop - start
        if done:
            log(f"detections: resuming, {done} of {n} images already in {self.partial_dir}")
        bar = tqdm(total=n, initial=done, desc="detect", disable=not progress, dynamic_ncols=True)
        try:
            for start, stop in chunks:
                if per_image[start] is not None:
                    continue
                results: list[dict] = []
                for b in range(start, stop, batch_size):
                    indices = list(range(b, min(b + batch_size, stop)))
                    out = run(indices)
                    if len(out) != len(indices):
                        raise RuntimeError(f"the detector returned {len(out)} results for {len(indices)} images")
                    results.extend(out)
                    bar.update(len(indices))
                chunk = Detections.concatenate(self.ids[start:stop], results)
                _write_npz_atomic(self._chunk_path(start, stop), chunk.arrays(), self._meta(start=start, stop=stop))
                per_image[start:stop] = results
        finally:
            bar.close()
        detections = Detections.concatenate(self.ids, per_image)
        _write_npz_atomic(self.path, detections.arrays(), self._meta(count=n, complete=True))
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return detections

    def load_or_build(self, run: RunFn, batch_size: int = 8, progress: bool = True,
                      log: Callable[[str], None] = print) -> Detections:
        """The cached detections if the file is valid; else (reporting why) build them."""
        for other in self.other_checkpoints():
            log(f"detections: ignoring {other.name}: stale, made by another detector checkpoint")
        try:
            found = self.load()
        except DetectionCacheError as exc:
            log(f"detections: cache {self.path} is unusable ({exc}); rebuilding it")
            self.path.unlink(missing_ok=True)
            found = None
        if found is not None:
            return found
        return self.build(run, batch_size, progress, log)


class BoxMaskProvider:
    """Per-image box masks ``(C, H, W)`` of the detections scoring ``>= tau_det``, for the unlabelled stream.

    ``provider(index, size)`` gives a uint8 mask at the image's own size (checked against the size the detector saw),
    ready to go through the same weak geometry as the image; ``batch(indices)`` stacks bool masks of equally sized
    images (reports, the benchmark). Picklable, so it works in DataLoader workers.
    """

    def __init__(self, detections: Detections, num_classes: int, tau_det: float = 0.95) -> None:
        self.detections, self.num_classes, self.tau_det = detections, num_classes, tau_det

    def __call__(self, index: int, size: Optional[tuple[int, int]] = None) -> Tensor:
        stored = tuple(int(v) for v in self.detections.sizes[index])
        if size is not None and tuple(size) != stored:
            raise ValueError(f"image {self.detections.ids[index]!r} is {tuple(size)} but its detections were made "
                             f"on {stored}; rebuild the detections")
        boxes, labels, scores = self.detections.get(index)
        mask = box_mask_from_detections(torch.from_numpy(boxes), torch.from_numpy(labels), torch.from_numpy(scores),
                                        self.num_classes, stored, self.tau_det)
        return mask.to(torch.uint8)

    def batch(self, indices: Sequence[int]) -> Tensor:
        return torch.stack([self(i).bool() for i in indices])


def box_quality(detections, source, indices, tau: float) -> dict:
    """Detections ``>= tau`` that match a same-class ground-truth box at IoU >= 0.5 (share of detections: precision;
    share of ground-truth boxes found: recall). Only for reports: training never reads unlabelled annotations."""
    tp = found = n_det = n_gt = 0
    indices = list(indices)
    for i in indices:
        s = source.load(i)
        boxes, labels, scores = detections.get(i)
        keep = scores >= tau
        b, lab = torch.from_numpy(boxes[keep]), labels[keep]
        n_det += len(b)
        n_gt += len(s.boxes)
        if len(b) and len(s.boxes):
            hit = (box_iou(b, torch.from_numpy(np.asarray(s.boxes, np.float32))) >= 0.5).numpy()
            hit &= lab[:, None] == np.asarray(s.box_labels)[None]
            tp += int(hit.any(axis=1).sum())
            found += int(hit.any(axis=0).sum())
    return {"images": len(indices), "detections": n_det, "gt_boxes": n_gt, "precision": tp / max(n_det, 1),
            "recall": found / max(n_gt, 1)}
