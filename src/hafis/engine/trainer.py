"""The one trainer every framework runs on: data streams, optimiser and schedule, evaluation, logs, checkpoints.

A framework supplies the loss of one step (:class:`hafis.frameworks.Framework`); everything else is here, so a
framework is a recipe of a few dozen lines and all of them log, evaluate and resume the same way.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from hafis.config import Config, ConfigError, config_changes, to_dict
from hafis.data import build_sources
from hafis.data.base import DataError
from hafis.data.splits import split_digests
from hafis.errors import short
from hafis.files import atomic_write
from hafis.data.ssl import MIX_STREAM, InfiniteSampler, LabelledDataset, UnlabelledDataset
from hafis.frameworks import Framework, build_framework
from hafis.models.fast_conv import use_fast_convs

from . import distributed
from .build import build_model, resolve_device
from .checkpoint import (CheckpointError, CheckpointManager, load_checkpoint, load_module_state,
                         require_training_state)
from .detect import box_mask_provider, detected_classes
from .evaluation import EvalResult, build_eval_loader, eval_settings, evaluate
from .optim import build_optimizer
from .run_log import RunLog, truncate_metrics


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); True where torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    return not checks or any(c() for c in checks)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


def _with_mix(batches: Iterator[dict], mix: Iterator[dict]) -> Iterator[dict]:
    for batch, other in zip(batches, mix):
        yield {**batch, "mix": other}


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """The published schedule ``lr · (1 - it / max_it) ^ power``."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


def _content(digest: Optional[str]) -> str:
    return f"file content {digest[:12]}" if isinstance(digest, str) else "<absent>"


def _allowed(key: str, allow_change: tuple) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow_change)


class Trainer:
    """Builds everything a run needs from a :class:`~hafis.config.Config` and trains it.

    ``on_eval(trainer, iteration, result)`` is called after every evaluation (a benchmark measures the model there).
    """

    def __init__(self, config: Config, on_eval: Optional[Callable] = None) -> None:
        self.config = config
        self.on_eval = on_eval
        self.device = resolve_device(config.train.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.batch_size = self._per_rank(config.train.batch_size, "train.batch_size")
        self.unlabelled_batch_size = self._per_rank(config.train.unlabelled_batch_size, "train.unlabelled_batch_size")
        torch.manual_seed(config.seed)
        self.labelled_source, self.unlabelled_source, self.val_source = build_sources(config.data)
        #: the split files' content hashes, checked on resume like the config
        self.split_digests = split_digests(config.data)
        self.num_classes = self.labelled_source.num_classes
        self.class_names = list(self.labelled_source.class_names)
        self.model = build_model(config, self.num_classes)
        if config.train.fast_convs:
            use_fast_convs(self.model)  # in place, like the conversions below: the state-dict keys stay
        if config.train.amp == "bf16" and self.device.type == "cpu" and not native_bf16():
            warnings.warn("train.amp=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates bf16, "
                          "which is slower than float32 (benchmarks/iteration.py: 1.65x the float32 step); "
                          "train.amp=off is faster here", stacklevel=2)
        self.model.to(self.device)
        if config.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.train.compile:
            self.model.compile()  # in place: state-dict keys and the frameworks' calls stay unchanged
        try:
            self.framework: Framework = build_framework(config, self.model, self.num_classes).to(self.device)
        except ValueError as exc:  # a key that does not fit the dataset, e.g. a class index beyond its classes
            raise ConfigError(f"{config.train.framework}: {exc}") from None
        if self.dist.enabled and config.train.sync_bn:  # every trained network, framework-owned heads included
            for name in self.framework.networks:
                distributed.convert_sync_batchnorm(getattr(self.framework, name), self.device)
        if self.dist.enabled:  # the framework's networks are called through one DDP from here on
            distributed.wrap(self.framework, self.framework.networks, self.device, self.framework.static_graph)
            for teacher in self.framework.teachers():
                distributed.broadcast_buffers(teacher, parameters=True)
        self._check_not_empty()
        self.framework.epoch_iterations = max(1, len(self.unlabelled_source) // config.train.unlabelled_batch_size)
        self.framework.weighting.thing_classes = tuple(detected_classes(config, self.unlabelled_source))
        #: detection box masks of the unlabelled images (weighting.reliable: detector), else None
        self.box_masks = self._box_masks()
        #: images, ground truth and box masks probed by the diagnostics (eval.diagnostics_images), loaded once
        self._probe: Optional[tuple] = None
        o = config.optim
        self.optimizer = build_optimizer(
            self.model.param_groups(o.lr, o.head_lr_multiplier, o.weight_decay)
            + self.framework.param_groups(o.lr, o.head_lr_multiplier, o.weight_decay), o)
        self.run_dir = config.run_dir
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", config.train.keep_checkpoints)
        self.iteration = 0
        #: set by :meth:`resume`, found a checkpoint or not: the folder's records past ``iteration`` are dropped
        self.resumed = False
        #: keys changed on resume with --allow-change, old -> new; logged once training starts
        self.resume_changes: dict = {}
        self.best_miou = float("-inf")
        self.nonfinite_skips = 0
        #: loss scaling only for fp16; a disabled scaler is a pass-through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.amp == "fp16")
        self.val_loader = build_eval_loader(self.val_source, config.eval.batch_size, config.data.num_workers,
                                            self.dist.rank, self.dist.world_size)

    # ------------------------------------------------------------------------------------------------ data
    def _box_masks(self):
        """The cached detections' box masks when the weighting uses the detector; a missing or stale cache stops
        here with the ``hafis detect`` command to run (nothing has been written yet)."""
        w = self.config.weighting
        if not (w.enabled and w.reliable == "detector" and self.framework.uses_unlabelled):
            return None
        return box_mask_provider(self.config, self.labelled_source, self.unlabelled_source, self.num_classes)

    def _stream(self, dataset, batch_size: int, seed: int) -> Iterator[dict]:
        # the stream is global (start counts global samples); each rank takes its share of every global batch
        sampler = InfiniteSampler(len(dataset), seed, start=self.iteration * batch_size * self.dist.world_size,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        # a loader of its own generator: creating its iterator must not draw from the global RNG, or a resumed run
        # (whose loaders start at another point of the RNG stream) would diverge from an uninterrupted one
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=self.config.data.num_workers > 0,
                            generator=torch.Generator().manual_seed(seed))
        for batch in loader:
            yield {k: self._to_device(v) for k, v in batch.items()}

    def _to_device(self, value):
        if not torch.is_tensor(value):
            return value
        value = value.to(self.device, non_blocking=True)
        if self.config.train.channels_last and value.dim() == 4 and value.is_floating_point():  # images, not masks
            value = value.contiguous(memory_format=torch.channels_last)
        return value

    def _streams(self) -> tuple[Iterator[dict], Optional[Iterator[dict]]]:
        c = self.config
        labelled = self._stream(LabelledDataset(self.labelled_source, c.data.crop_size, c.data.scale_range, c.seed),
                                self.batch_size, c.seed)
        unlabelled = None
        if self.framework.uses_unlabelled:
            dataset = UnlabelledDataset(self.unlabelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                        self.framework.cutmix_prob, box_masks=self.box_masks)
            unlabelled = self._stream(dataset, self.unlabelled_batch_size, c.seed + 1)
            if self.framework.mix_batch:
                # a second unlabelled stream (own augmentations; the main stream's order for same_images, its own
                # for other_images) for the mixed-in images; it advances in step with the first, so a resumed run
                # replays it too
                mix = UnlabelledDataset(self.unlabelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                        self.framework.cutmix_prob, box_masks=self.box_masks, stream=MIX_STREAM)
                order = c.seed + 1 if self.framework.mix_batch == "same_images" else c.seed + 2
                unlabelled = _with_mix(unlabelled, self._stream(mix, self.unlabelled_batch_size, order))
        return labelled, unlabelled

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "model": distributed.unwrap(self.framework.eval_model()).state_dict(),
            "student": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "framework": self.framework.state_dict(),
            "best_miou": self.best_miou,
            "nonfinite_skips": self.nonfinite_skips,
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": to_dict(self.config),
            "class_names": list(self.class_names),
            "split_digests": self.split_digests,
            # every rank's bank generator (ranks draw from their own seeds); filled in at checkpoints under torchrun
            "bank_generators": None,
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        require_training_state(state, source.removeprefix("checkpoint "))
        load_module_state(self.model, state["student"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.framework.load_state_dict(state["framework"])
            generators, weighter = state.get("bank_generators"), self.framework.weighting.weighter
            if generators and weighter is not None:  # this rank's own draws (a rank the run lacked starts afresh)
                weighter.bank.set_extra_state(generators[self.dist.rank] if self.dist.rank < len(generators) else {})
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{source}: the optimiser or framework state does not fit this run: {first}") \
                from None
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.nonfinite_skips = state.get("nonfinite_skips", 0)

    def resume(self, path: Optional[Path] = None, allow_change: tuple = ()) -> Optional[Path]:
        """Continue from ``path`` or from the newest readable checkpoint of the run; ``None`` if there is none.

        A checkpoint of another experiment (a changed key that is not declared ``runtime``) is refused with every
        changed key listed, unless each is named in ``allow_change`` (a key or a whole section)."""
        self.resumed = True
        if path is not None:
            state = load_checkpoint(Path(path))
        else:
            found = self.checkpoints.load_latest()
            if found is None:
                return None
            path, state = found
        changes = config_changes(state.get("config"), self.config)
        old_digests = state.get("split_digests")
        if isinstance(old_digests, dict):  # a checkpoint from before split hashes has none to compare
            for key in sorted(set(old_digests) | set(self.split_digests)):
                if key not in changes and old_digests.get(key) != self.split_digests.get(key):
                    changes[key] = (_content(old_digests.get(key)), _content(self.split_digests.get(key)))
        refused = {k: v for k, v in changes.items() if not _allowed(k, allow_change)}
        if refused:
            listed = "; ".join(f"{k}: {short(old)} -> {short(new)}" for k, (old, new) in refused.items())
            raise ConfigError(f"cannot resume from {path}: the config changed the experiment ({listed}); start a "
                              f"new run (another name or output_dir), or accept with --allow-change KEY")
        self.resume_changes = changes
        self.load_state_dict(state, f"checkpoint {path}")
        return Path(path)

    # ---------------------------------------------------------------------------------------------- training
    def train(self) -> Optional[EvalResult]:
        c = self.config
        main = self.dist.is_main  # only rank 0 writes logs and checkpoints
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(c), sort_keys=False))
            if self.resumed:  # records past the checkpoint (all, without one) are written again by replayed steps
                truncate_metrics(self.run_dir / "metrics.jsonl", self.iteration)
        log = RunLog(self.run_dir, tensorboard=c.train.tensorboard, enabled=main)
        if self.resume_changes:
            log.write({"iteration": self.iteration, "event": "resume_with_changes",
                       "changed": {k: {"old": old, "new": new} for k, (old, new) in self.resume_changes.items()}})
            self.resume_changes = {}
        labelled, unlabelled = self._streams()
        total = c.train.iterations
        bar = tqdm(total=total, initial=self.iteration, disable=not (c.train.progress_bar and main), desc=c.name,
                   dynamic_ncols=True)
        result = None
        self.model.train()
        window_start = time.perf_counter()
        try:
            while self.iteration < total:
                it = self.iteration
                schedule_it = max(it - self.framework.lr_lag, 0)
                for group in self.optimizer.param_groups:
                    group["lr"] = poly_lr(group["initial_lr"], schedule_it, total, c.optim.poly_power)
                batch_l = next(labelled)
                batch_u = next(unlabelled) if unlabelled else None
                with self._autocast():
                    step = self.framework.train_step(batch_l, batch_u, it)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(step.loss).backward()
                # the one host read of the step, after backward is queued (the device stays busy meanwhile)
                if self._finite_or_skip(step, it):  # DDP averaged the gradients during backward
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.framework.after_optimizer_step(it)
                self.iteration = it + 1
                bar.update(1)
                if self.iteration % c.train.log_interval == 0 or self.iteration == total:
                    record = {"iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"],
                              "loss": float(step.loss.detach()), **{k: float(v) for k, v in step.terms.items()},
                              "seconds_per_iteration": (time.perf_counter() - window_start) / c.train.log_interval}
                    window_start = time.perf_counter()
                    log.write(record, "train")
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                evaluate_now = self.iteration % c.train.eval_interval == 0 or self.iteration == total
                save_now = evaluate_now if c.train.checkpoint_interval <= 0 else \
                    (self.iteration % c.train.checkpoint_interval == 0 or self.iteration == total)
                bank_generators = None
                if self.dist.enabled and (evaluate_now or save_now):
                    bank_generators = self._sync_replicas()
                if evaluate_now:
                    result = self._evaluate(log)
                if save_now and main:
                    self.checkpoints.save({**self.state_dict(), "bank_generators": bank_generators}, self.iteration)
                if evaluate_now and self.on_eval is not None:
                    self.on_eval(self, self.iteration, result)
        finally:
            bar.close()
            log.close()
        return result

    def _check_not_empty(self) -> None:
        parts = [("labelled", self.labelled_source), ("val", self.val_source)]
        if self.framework.uses_unlabelled:
            parts.append(("unlabelled", self.unlabelled_source))
        for part, source in parts:
            if len(source) == 0:
                raise DataError(f"the {part} split is empty ({source!r}, data.dataset={self.config.data.dataset!r}); "
                                f"check data.root and the split files, or run `hafis prepare`")

    def _per_rank(self, global_batch: int, key: str) -> int:
        if global_batch % self.dist.world_size:
            raise ConfigError(f"'{key}' = {global_batch} (the global batch) is not divisible by the "
                              f"{self.dist.world_size} processes")
        return global_batch // self.dist.world_size

    def _sync_replicas(self) -> Optional[list]:
        """Before an evaluation or a checkpoint: rank 0's BatchNorm buffers on every rank (DDP broadcasts them only
        before a forward pass), then check that every rank holds the same networks, teachers and prototype bank.
        Returns every rank's bank generator state, for the checkpoint."""
        modules = [self.model, *(distributed.unwrap(getattr(self.framework, n)) for n in self.framework.networks),
                   *self.framework.teachers()]
        modules = list({id(m): m for m in modules}.values())
        for module in modules:
            distributed.broadcast_buffers(module)
        weighter = self.framework.weighting.weighter
        for module in modules + ([weighter] if weighter is not None else []):
            distributed.check_replicas(module, self.device)
        return None if weighter is None else distributed.gather_objects(weighter.bank.get_extra_state())

    def _autocast(self):
        amp = self.config.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _finite_or_skip(self, step, iteration: int) -> bool:
        """True when the loss is finite; else the step is skipped, or training stops once too many were skipped."""
        finite = bool(torch.isfinite(step.loss.detach()))
        if self.dist.enabled:
            finite = distributed.all_ranks_agree(finite, self.device)
        if finite:
            return True
        bad = [k for k, v in step.terms.items() if not bool(torch.isfinite(v))] or ["loss"]
        self.nonfinite_skips += 1
        limit = self.config.train.max_nonfinite_skips
        message = (f"non-finite loss at iteration {iteration}: term(s) {', '.join(bad)} "
                   f"({self.nonfinite_skips} non-finite step(s) so far, train.max_nonfinite_skips={limit})")
        if self.nonfinite_skips > limit:
            raise NonFiniteLossError(message + "; stopping, the last checkpoint is kept")
        warnings.warn(message + "; step skipped", stacklevel=2)
        return False

    def _evaluate(self, log: RunLog) -> EvalResult:
        result = evaluate(distributed.unwrap(self.framework.eval_model()), self.val_loader, self.num_classes,
                          self.device, **eval_settings(self.config))
        self.best_miou = max(self.best_miou, result.miou)
        main_model = self.framework.eval_model()
        others = {name: result.miou if model is main_model else
                  evaluate(distributed.unwrap(model), self.val_loader, self.num_classes, self.device,
                           **eval_settings(self.config)).miou
                  for name, model in self.framework.eval_models().items()}
        record = {"iteration": self.iteration, "event": "eval", **result.record(), "best_miou": self.best_miou,
                  "seed": self.config.seed, "iou_by_class": dict(zip(self.class_names, result.iou)),
                  "labelled": len(self.labelled_source), "unlabelled": len(self.unlabelled_source)}
        if others:  # every evaluated network's mIoU (miou: the run's model); best_network names the highest
            record.update({f"miou_{name}": miou for name, miou in others.items()})
            record["best_network"] = max(others.items(), key=lambda kv: kv[1])[0]
        # a fully supervised run has no unlabelled image to measure pseudo-labels on
        if self.config.eval.diagnostics_images > 0 and len(self.unlabelled_source) > 0 and self.dist.is_main:
            record["diagnostics"] = self._diagnostics()
        log.write(record, "val")
        return result

    def _diagnostics(self) -> dict:
        """Pseudo-label quality on a fixed set of unlabelled images (:mod:`hafis.engine.diagnostics`); measured
        only: it draws no random numbers and changes no state, so training is the same with it on or off."""
        from .diagnostics import load_images, pseudo_label_quality

        if self._probe is None:
            n = min(self.config.eval.diagnostics_images, len(self.unlabelled_source))
            images, gt = load_images(self.unlabelled_source, range(n))
            boxes = self.box_masks.batch(range(n)) if self.box_masks is not None else None
            self._probe = (images, gt, boxes, n)
        images, gt, boxes, n = self._probe
        stats = pseudo_label_quality(self.framework, images, gt, self.config.eval.batch_size, box_masks=boxes)
        return {"images": n, **{k: None if math.isnan(v) else v for k, v in stats.items()}}
