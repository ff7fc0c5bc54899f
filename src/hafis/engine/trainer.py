"""The one trainer every framework runs on: data streams, optimiser, one step, resume.

A framework supplies the loss of one step (:class:`hafis.frameworks.Framework`; docs/frameworks.md); the trainer runs
the step (:meth:`Trainer.run_step`) and its hooks (:mod:`hafis.engine.hooks`: schedule, logs, replica sync,
evaluation, checkpoints, callback) do the rest, so a framework is a recipe of a few dozen lines and all of them log,
evaluate and resume the same way.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml

from hafis.config import Config, ConfigError, to_dict
from hafis.data import build_sources
from hafis.data.base import DataError
from hafis.data.splits import split_digests
from hafis.data.ssl import LabelledBatch, UnlabelledBatch
from hafis.detection.step import box_mask_provider, detected_classes
from hafis.files import atomic_write
from hafis.frameworks import Framework, FrameworkContext, StepOutput, build_framework
from hafis.models.fast_conv import use_fast_convs
from hafis.precision import resolve_amp, warn_if_emulated

from . import distributed
from .build import build_model, resolve_device
from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    experiment_changes,
    load_checkpoint,
    load_module_state,
    require_training_state,
)
from .evaluation import EvalResult
from .hooks import Hook, default_hooks
from .optim import build_optimizer
from .run_folder import record_provenance
from .run_log import RunLog, truncate_metrics
from .streams import training_streams


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


class Trainer:
    """Builds everything a run needs from a :class:`~hafis.config.Config` and trains it.

    ``on_eval(trainer, iteration, result)`` is called after every evaluation (a benchmark measures the model there).
    ``hooks`` (:func:`~hafis.engine.hooks.default_hooks`) are the periodic actions around :meth:`run_step`; a new
    one is inserted there before :meth:`train`.
    """

    def __init__(self, config: Config, on_eval: Optional[Callable] = None) -> None:
        self.config, self.on_eval = config, on_eval
        self.device = resolve_device(config.train.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        #: the precision the step trains in (``train.amp`` resolved on this device: auto -> bf16 or off) and why
        self.amp, self.amp_reason = resolve_amp(config.train.amp, self.device)
        self.batch_size = self._per_rank(config.train.batch_size, "train.batch_size")
        self.unlabelled_batch_size = self._per_rank(config.train.unlabelled_batch_size, "train.unlabelled_batch_size")
        torch.manual_seed(config.seed)
        self.labelled_source, self.unlabelled_source, self.val_source = build_sources(config.data)
        #: the split files' content hashes, checked on resume like the config
        self.split_digests = split_digests(config.data)
        self.num_classes = self.labelled_source.num_classes
        self.class_names = list(self.labelled_source.class_names)
        self.model = self._build_model()
        self.framework = self._build_framework()
        self._check_not_empty()
        #: detection box masks of the unlabelled images (weighting.reliable: detector), else None
        self.box_masks = self._box_masks()
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
        self.best_miou, self.nonfinite_skips = float("-inf"), 0
        #: loss scaling only for fp16; a disabled scaler is a pass-through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        #: what the hooks share during :meth:`train`: the latest evaluation, and every rank's framework
        #: ``rank_state`` gathered before a checkpoint under torchrun (None on one process)
        self.last_eval: Optional[EvalResult] = None
        self.rank_states: Optional[list] = None
        self.log: Optional[RunLog] = None
        self.hooks: list[Hook] = default_hooks(self)

    def _build_model(self):
        config = self.config
        model = build_model(config, self.num_classes)
        if config.train.fast_convs:
            use_fast_convs(model)  # in place, like the conversions below: the state-dict keys stay
        warn_if_emulated(self.amp, self.device, stacklevel=4)
        model.to(self.device)
        if config.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if config.train.compile:
            model.compile()  # in place: state-dict keys and the frameworks' calls stay unchanged
        return model

    def _build_framework(self) -> Framework:
        config = self.config
        ctx = FrameworkContext(self.num_classes,
                               epoch_length=max(1, len(self.unlabelled_source) // config.train.unlabelled_batch_size),
                               thing_classes=tuple(detected_classes(config, self.unlabelled_source)))
        try:
            framework = build_framework(config, self.model, ctx).to(self.device)
        except ValueError as exc:  # a key that does not fit the dataset, e.g. a class index beyond its classes
            raise ConfigError(f"{config.train.framework}: {exc}") from None
        traits = framework.traits
        if self.dist.enabled and config.train.sync_bn:  # every trained network, framework-owned heads included
            for name in traits.networks:
                distributed.convert_sync_batchnorm(getattr(framework, name), self.device)
        if self.dist.enabled:  # the framework's networks are called through one DDP from here on
            distributed.wrap(framework, traits.networks, self.device, traits.static_graph)
            for teacher in framework.teachers():
                distributed.broadcast_buffers(teacher, parameters=True)
        return framework

    # ------------------------------------------------------------------------------------------------ data
    def _box_masks(self):
        """The cached detections' box masks when the weighting uses the detector; a missing or stale cache stops
        here with the ``hafis detect`` command to run (nothing has been written yet)."""
        w = self.config.weighting
        if not (w.enabled and w.reliable == "detector" and self.framework.traits.uses_unlabelled):
            return None
        return box_mask_provider(self.config, self.labelled_source, self.unlabelled_source, self.num_classes)

    def _streams(self) -> tuple[Iterator[LabelledBatch], Optional[Iterator[UnlabelledBatch]]]:
        """The labelled and unlabelled streams from ``iteration`` on (:func:`hafis.engine.streams.training_streams`)."""
        return training_streams(self)

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
            "amp": self.amp,  # the precision trained in (train.amp resolved), compared on resume
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
            generators = state.get("bank_generators")
            if generators:  # this rank's own draws (a rank the run lacked starts afresh)
                self.framework.load_rank_state(generators[self.dist.rank] if self.dist.rank < len(generators) else {})
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
        precision = (self.amp, self.amp_reason)
        self.resume_changes = experiment_changes(state, self.config, self.split_digests, allow_change, path, precision)
        self.load_state_dict(state, f"checkpoint {path}")
        return Path(path)

    # ---------------------------------------------------------------------------------------------- training
    def train(self) -> Optional[EvalResult]:
        """Steps until ``train.iterations``, with every hook called in order (:mod:`hafis.engine.hooks`); the last
        evaluation's result (None when no step ran)."""
        self._open_run()
        labelled, unlabelled = self._streams()
        self.last_eval = None
        self.model.train()
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.iteration < self.config.train.iterations:
                for hook in self.hooks:
                    hook.before_step(self)
                step = self.run_step(next(labelled), next(unlabelled) if unlabelled else None)
                for hook in self.hooks:
                    hook.after_step(self, step)
        finally:
            for hook in self.hooks:
                hook.after_train(self)
            self.log.close()
        return self.last_eval

    def run_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch]) -> StepOutput:
        """One step at the rates the hooks set: the framework's loss under autocast, backward, the optimiser (not
        when the loss is not finite: :meth:`_finite_or_skip`), the framework's after-step update; then
        ``iteration`` + 1."""
        it = self.iteration
        with self._autocast():
            step = self.framework.train_step(labelled, unlabelled, it)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(step.loss).backward()
        # the one host read of the step, after backward is queued (the device stays busy meanwhile)
        if self._finite_or_skip(step, it):  # DDP averaged the gradients during backward
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.framework.after_optimizer_step(it)
        self.iteration = it + 1
        return step

    def _open_run(self) -> None:
        """The run folder (rank 0 writes) and its log, with the keys a resume changed."""
        c = self.config
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(c), sort_keys=False))
            if self.resumed:  # records past the checkpoint (all, without one) are written again by replayed steps
                truncate_metrics(self.run_dir / "metrics.jsonl", self.iteration)
        self.log = RunLog(self.run_dir, tensorboard=c.train.tensorboard, enabled=self.dist.is_main)
        if self.dist.is_main:
            record_provenance(self.run_dir, self.iteration, self.device, self.dist.world_size, c.train.amp,
                              self.amp, self.amp_reason)
        if self.resume_changes:
            self.log.write({"iteration": self.iteration, "event": "resume_with_changes",
                            "changed": {k: {"old": old, "new": new} for k, (old, new) in self.resume_changes.items()}})
            self.resume_changes = {}

    def _check_not_empty(self) -> None:
        parts = [("labelled", self.labelled_source), ("val", self.val_source)]
        if self.framework.traits.uses_unlabelled:
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

    def _autocast(self):
        amp = self.amp
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
