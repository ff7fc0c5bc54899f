"""``hafis detect``: train (or load) the detector on the labelled images, run it once over the unlabelled images,
cache the detections; and the trainer's side, which finds that cache for ``weighting.reliable: detector``.

Files (``detector.output_dir``, default ``runs/{name}/detector``): ``detector.pt`` (the trained detector with the
recipe it was trained with) and ``detections/`` (:mod:`.cache`). ``detector.checkpoint`` points at a detector trained
elsewhere instead. A ``detector.pt`` whose recipe (:func:`~.identity.training_recipe`: architecture, schedule,
labelled images, seed ...) differs from the config is reported and retrained, never silently reused; the same holds
for a detection cache of another checkpoint (its name and header carry the checkpoint's SHA-256).

``hafis train`` never trains a detector: with ``weighting.reliable: detector`` and no usable cache it stops with
:class:`~.cache.DetectionsMissingError` naming the ``hafis detect`` command to run. Training a detector is minutes
to hours of work that belongs in its own, resumable step; silently doing it inside ``train`` would also make two runs
that share a detector train it twice.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from hafis.config import Config, ConfigError
from hafis.data import build_sources
from hafis.data.base import SegmentationSource, load_checked
from hafis.engine.build import resolve_device
from hafis.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic

from .cache import BoxMaskProvider, DetectionCache, DetectionCacheError, Detections, DetectionsMissingError
from .identity import data_identity, file_digest, inference_identity, split_key, training_recipe

__all__ = ["component_classes", "detected_classes", "detector_dir", "default_checkpoint_path", "load_detector",
           "train_or_load_detector", "run_detect", "detection_cache", "box_mask_provider"]

_KIND = "hafis-detector"


def detector_dir(config: Config) -> Path:
    return Path(config.detector.output_dir.format(name=config.name))


def default_checkpoint_path(config: Config) -> Path:
    return detector_dir(config) / "detector.pt"


def component_classes(config: Config, source: SegmentationSource) -> list[int]:
    """The class ids of ``detector.component_classes`` under ``boxes: combined`` (else none); a name the dataset
    does not have is a :class:`ConfigError` naming the key."""
    d = config.detector
    if d.boxes != "combined":
        return []
    names = list(source.class_names)
    unknown = [n for n in d.component_classes if n not in names]
    if unknown:
        raise ConfigError(f"detector.component_classes: {unknown[0]!r} is not a class of dataset "
                          f"{config.data.dataset!r} (classes: {', '.join(names)})")
    return sorted(names.index(n) for n in d.component_classes)


def detected_classes(config: Config, source: SegmentationSource) -> list[int]:
    """The classes the detector detects: the dataset's thing classes, plus the component classes in ``combined``."""
    return sorted({int(c) for c in source.thing_classes} | set(component_classes(config, source)))


def _thing_classes(config: Config, source: SegmentationSource) -> list[int]:
    things = detected_classes(config, source)
    if not things:
        raise ValueError(f"dataset {type(source).__name__} declares no thing classes: there is nothing to detect; "
                         "use weighting.reliable=confidence")
    return things


def _build(state_or_recipe: dict, things: list[int], config: Config, pretrained: bool = True):
    from .networks import build_detector

    d = config.detector
    return build_detector(state_or_recipe["arch"], len(things), min_size=state_or_recipe["min_size"],
                          max_size=state_or_recipe["max_size"], score_threshold=d.score_threshold,
                          detections_per_image=d.detections_per_image,
                          backbone_weights=state_or_recipe.get("backbone_weights"), pretrained=pretrained)


def _device(config: Config) -> torch.device:
    return resolve_device(config.train.device)


def load_detector(path: Path, config: Config, things: list[int]):
    """A detector checkpoint written by :func:`train_or_load_detector`, ready for inference."""
    state = load_checkpoint(path)
    if state.get("kind") != _KIND:
        raise CheckpointError(f"{path} is not a hafis detector checkpoint (hafis detect writes one)")
    if list(state["thing_classes"]) != things:
        raise CheckpointError(f"detector {path} detects classes {state['thing_classes']}, the dataset's thing "
                              f"classes are {things}")
    model = _build(state["recipe"], things, config, pretrained=False)  # every weight comes from the checkpoint
    model.load_state_dict(state["model"])
    return model.eval(), state


def _checkpoint_problem(path: Path, recipe: dict) -> Optional[str]:
    """Why ``path`` must not be used as the detector of ``recipe`` (``None`` when it may)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    if state.get("kind") != _KIND:
        return f"{path} is not a hafis detector checkpoint"
    old = state.get("recipe", {})
    changed = sorted(k for k in set(recipe) | set(old) if recipe.get(k) != old.get(k))
    if changed:
        return f"{path} was trained with another recipe (differs in: {', '.join(changed)})"
    return None


def train_or_load_detector(config: Config, labelled: SegmentationSource, *, retrain: bool = False,
                           log: Callable[[str], None] = print, progress: bool = True):
    """``(model, checkpoint path)``: ``detector.checkpoint`` if set, else ``detector.pt`` of ``output_dir`` when its
    recipe matches the config, else a detector trained now on ``labelled`` and saved atomically there."""
    from tqdm import tqdm

    from .train import DetectionDataset, train_detector

    things = _thing_classes(config, labelled)
    d = config.detector
    if d.checkpoint is not None:
        path = Path(d.checkpoint)
        model, _ = load_detector(path, config, things)
        log(f"detect: using the detector checkpoint {path}")
        return model, path
    path = default_checkpoint_path(config)
    recipe = training_recipe(config, labelled)
    if path.is_file() and not retrain:
        problem = _checkpoint_problem(path, recipe)
        if problem is None:
            model, _ = load_detector(path, config, things)
            log(f"detect: reusing the trained detector {path}")
            return model, path
        log(f"detect: {problem}; retraining it")
    torch.manual_seed(config.seed)
    model = _build(recipe, things, config)
    dataset = DetectionDataset(labelled, things, d.boxes, d.component_min_area, seed=config.seed,
                               component_classes=component_classes(config, labelled))
    log(f"detect: training a {d.arch} detector on {len(labelled)} labelled images for {d.iterations} steps "
        f"(Adam, lr {d.lr:g}, batch {d.batch_size})")
    bar = tqdm(total=d.iterations, desc="detector", disable=not progress, dynamic_ncols=True)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    t0 = time.perf_counter()
    try:
        losses = train_detector(model, dataset, d.iterations, batch_size=d.batch_size, lr=d.lr,
                                weight_decay=d.weight_decay, seed=config.seed, device=_device(config),
                                num_workers=config.data.num_workers, on_step=on_step)
    finally:
        bar.close()
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    log(f"detect: detector loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} "
        f"in {time.perf_counter() - t0:.0f} s")
    save_atomic({"kind": _KIND, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "recipe": recipe,
                 "thing_classes": things, "losses": losses}, path)
    return model.eval(), path


def detection_cache(config: Config, unlabelled: SegmentationSource, checkpoint_hash: str) -> DetectionCache:
    """The cache of ``unlabelled``'s detections by the checkpoint with ``checkpoint_hash``."""
    d = config.detector
    identity = {**data_identity(config, unlabelled, "unlabelled"), **inference_identity(config)}
    return DetectionCache(detector_dir(config) / "detections", "unlabelled", split_key(unlabelled.ids, identity),
                          checkpoint_hash, unlabelled.ids, d.chunk_size)


def run_detect(config: Config, *, retrain: bool = False, log: Callable[[str], None] = print,
               progress: Optional[bool] = None) -> tuple[Detections, DetectionCache]:
    """The whole ``hafis detect`` step; returns the detections of every unlabelled image and their cache."""
    from .infer import detect

    progress = config.train.progress_bar if progress is None else progress
    labelled, unlabelled, _ = build_sources(config.data)
    model, path = train_or_load_detector(config, labelled, retrain=retrain, log=log, progress=progress)
    device = _device(config)
    model.to(device)
    things = _thing_classes(config, labelled)
    cache = detection_cache(config, unlabelled, file_digest(path))

    def run(indices):
        samples = [load_checked(unlabelled, i) for i in indices]
        out = detect(model, [s.image for s in samples], things, device)
        for o, s in zip(out, samples, strict=True):
            o["size"] = s.image.shape[:2]
        return out

    t0 = time.perf_counter()
    detections = cache.load_or_build(run, config.detector.inference_batch_size, progress, log)
    s = detections.summary(config.weighting.tau_det)
    log(f"detect: {s['images']} unlabelled images, {s['detections']} detections stored, {s['kept']} with score >= "
        f"tau_det {config.weighting.tau_det:g} on {s['images_with_kept']} images ({time.perf_counter() - t0:.0f} s); "
        f"cache {cache.path}")
    return detections, cache


def box_mask_provider(config: Config, labelled: SegmentationSource, unlabelled: SegmentationSource,
                      num_classes: int) -> BoxMaskProvider:
    """The trainer's box masks for ``weighting.reliable: detector``; :class:`DetectionsMissingError` with the
    command to run when the detector or its detections over ``unlabelled`` are missing, stale or partial."""
    hint = ("run `hafis detect CONFIG` with the same config and overrides first (or set "
            "weighting.reliable=confidence for the confidence-only rule)")
    d = config.detector
    path = Path(d.checkpoint) if d.checkpoint is not None else default_checkpoint_path(config)
    if not path.is_file():
        raise DetectionsMissingError(f"weighting.reliable is 'detector' but there is no detector checkpoint {path}; "
                                     f"{hint}")
    if d.checkpoint is None:
        problem = _checkpoint_problem(path, training_recipe(config, labelled))
        if problem is not None:
            raise DetectionsMissingError(f"{problem}; {hint}")
    cache = detection_cache(config, unlabelled, file_digest(path))
    try:
        detections = cache.load()
    except DetectionCacheError as exc:
        raise DetectionsMissingError(f"detection cache {cache.path} is unusable ({exc}); {hint}") from None
    if detections is None:
        partial = " (a partial build is there; it resumes)" if cache.partial_dir.is_dir() else ""
        raise DetectionsMissingError(f"no detections of detector {path} over the unlabelled images at {cache.path}"
                                     f"{partial}; {hint}")
    return BoxMaskProvider(detections, num_classes, config.weighting.tau_det)
