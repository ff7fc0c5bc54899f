"""The one trainer every framework runs on: data streams, optimiser and schedule, evaluation, logs, checkpoints.

A framework supplies the loss of one step (:class:`hafis.frameworks.Framework`); everything else is here, so a
framework is a recipe of a few dozen lines and all of them log, evaluate and resume the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from hafis.config import Config, to_dict
from hafis.data import build_sources
from hafis.data.ssl import EvalDataset, InfiniteSampler, LabelledDataset, UnlabelledDataset
from hafis.frameworks import Framework, build_framework
from hafis.models import build_segmenter

from .checkpoint import CheckpointManager, load_checkpoint
from .metrics import confusion_matrix, iou_per_class, mean_iou
from .run_log import RunLog


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(config: Config, num_classes: int) -> torch.nn.Module:
    m = config.model
    return build_segmenter(
        m.name, num_classes, backbone=m.backbone, output_stride=m.output_stride, feature_dim=m.feature_dim, aspp_channels=m.aspp_channels,
        fp_dropout=m.fp_dropout, pretrained=m.pretrained, pretrained_path=m.pretrained_path,
    )


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """The published schedule ``lr · (1 - it / max_it) ^ power``."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


@dataclass
class EvalResult:
    miou: float
    iou: list[Optional[float]]
    confusion: torch.Tensor

    def record(self) -> dict:
        return {"miou": self.miou, "iou": self.iou}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> EvalResult:
    """Whole-image evaluation: one confusion matrix over the set, then per-class IoU and mIoU."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in loader:
        logits = model(batch["image"].to(device)).logits
        confusion += confusion_matrix(logits.argmax(dim=1), batch["mask"].to(device), num_classes)
    model.train(was_training)
    confusion = confusion.cpu()
    iou = [None if math.isnan(v) else v for v in iou_per_class(confusion).tolist()]
    return EvalResult(mean_iou(confusion), iou, confusion)


class Trainer:
    """Builds everything a run needs from a :class:`~hafis.config.Config` and trains it.

    ``on_eval(trainer, iteration, result)`` is called after every evaluation (the demo uses it for pictures).
    """

    def __init__(self, config: Config, on_eval: Optional[Callable] = None) -> None:
        self.config = config
        self.on_eval = on_eval
        self.device = resolve_device(config.train.device)
        torch.manual_seed(config.seed)
        self.labelled_source, self.unlabelled_source, self.val_source = build_sources(config.data)
        self.num_classes = self.labelled_source.num_classes
        self.class_names = list(self.labelled_source.class_names)
        self.model = build_model(config, self.num_classes).to(self.device)
        self.framework: Framework = build_framework(config, self.model, self.num_classes).to(self.device)
        o = config.optim
        self.optimizer = torch.optim.SGD(
            self.model.param_groups(o.lr, o.head_lr_multiplier, o.weight_decay), lr=o.lr, momentum=o.momentum,
            weight_decay=o.weight_decay,
        )
        self.run_dir = config.run_dir
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", config.train.keep_checkpoints)
        self.iteration = 0
        self.best_miou = float("-inf")
        self.val_loader = DataLoader(EvalDataset(self.val_source), batch_size=config.eval.batch_size,
                                     num_workers=config.data.num_workers)

    # ------------------------------------------------------------------------------------------------ data
    def _stream(self, dataset, batch_size: int, seed: int) -> Iterator[dict]:
        sampler = InfiniteSampler(len(dataset), seed, start=self.iteration * batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=self.config.data.num_workers > 0)
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _streams(self) -> tuple[Iterator[dict], Optional[Iterator[dict]]]:
        c = self.config
        labelled = self._stream(LabelledDataset(self.labelled_source, c.data.crop_size, c.data.scale_range, c.seed),
                                c.train.batch_size, c.seed)
        unlabelled = None
        if self.framework.uses_unlabelled:
            dataset = UnlabelledDataset(self.unlabelled_source, c.data.crop_size, c.data.scale_range, c.seed,
                                        c.unimatch.cutmix_prob)
            unlabelled = self._stream(dataset, c.train.unlabelled_batch_size, c.seed + 1)
        return labelled, unlabelled

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "model": self.framework.eval_model().state_dict(),
            "student": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "framework": self.framework.state_dict(),
            "best_miou": self.best_miou,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": to_dict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.framework.load_state_dict(state["framework"])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def resume(self, path: Optional[Path] = None) -> Optional[Path]:
        """Continue from ``path`` or from the newest readable checkpoint of the run; ``None`` if there is none."""
        if path is not None:
            state = load_checkpoint(Path(path))
        else:
            found = self.checkpoints.load_latest()
            if found is None:
                return None
            path, state = found
        self.load_state_dict(state)
        return Path(path)

    # ---------------------------------------------------------------------------------------------- training
    def train(self) -> Optional[EvalResult]:
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
        log = RunLog(self.run_dir, tensorboard=c.train.tensorboard)
        labelled, unlabelled = self._streams()
        total = c.train.iterations
        bar = tqdm(total=total, initial=self.iteration, disable=not c.train.progress_bar, desc=c.name,
                   dynamic_ncols=True)
        result = None
        self.model.train()
        window_start = time.perf_counter()
        try:
            while self.iteration < total:
                it = self.iteration
                for group in self.optimizer.param_groups:
                    group["lr"] = poly_lr(group["initial_lr"], it, total, c.optim.poly_power)
                step = self.framework.train_step(next(labelled), next(unlabelled) if unlabelled else None, it)
                self._check_finite(step, it)
                self.optimizer.zero_grad(set_to_none=True)
                step.loss.backward()
                self.optimizer.step()
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
                if self.iteration % c.train.eval_interval == 0 or self.iteration == total:
                    result = self._evaluate_and_save(log)
        finally:
            bar.close()
            log.close()
        return result

    def _check_finite(self, step, iteration: int) -> None:
        if torch.isfinite(step.loss):
            return
        bad = [k for k, v in step.terms.items() if not torch.isfinite(v)] or ["loss"]
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: term(s) {', '.join(bad)}")

    def _evaluate_and_save(self, log: RunLog) -> EvalResult:
        result = evaluate(self.framework.eval_model(), self.val_loader, self.num_classes, self.device)
        self.best_miou = max(self.best_miou, result.miou)
        log.write({"iteration": self.iteration, "event": "eval", **result.record(), "best_miou": self.best_miou,
                   "seed": self.config.seed}, "val")
        self.checkpoints.save(self.state_dict(), self.iteration)
        if self.on_eval is not None:
            self.on_eval(self, self.iteration, result)
        return result
