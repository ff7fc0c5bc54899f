"""The trainer's periodic actions: one :class:`Hook` each, called in a fixed order around
:meth:`~hafis.engine.trainer.Trainer.run_step`.

:meth:`Trainer.train <hafis.engine.trainer.Trainer.train>` calls, for every hook of ``trainer.hooks`` in list
order::

    before_train(trainer)
    while trainer.iteration < train.iterations:
        before_step(trainer)              # trainer.iteration: the step about to run
        step = trainer.run_step(...)      # one step; trainer.iteration + 1
        after_step(trainer, step)         # trainer.iteration: the steps done
    after_train(trainer)                  # also when training stops with an error

:func:`default_hooks` gives the list, in this order: :class:`PolyLR`, :class:`MetricWriter`, :class:`ReplicaSync`,
:class:`Evaluation`, :class:`Checkpointer`, :class:`OnEval`. The order is part of the contract: the replicas agree
before they are evaluated and saved, a checkpoint holds the best mIoU of the evaluation of its own iteration, and the
callback runs once that checkpoint is on disk. Another periodic action (a logger, a BatchNorm recalibration) is one
more :class:`Hook`, inserted in ``trainer.hooks`` where it belongs; the loop stays as it is. Hooks share results
through two trainer attributes: ``trainer.last_eval`` (:class:`Evaluation`) and ``trainer.rank_states``
(:class:`ReplicaSync`). Every method receives the :class:`~hafis.engine.trainer.Trainer` itself.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

from tqdm import tqdm

from hafis.frameworks import StepOutput

from . import distributed
from .evaluation import EvalResult, build_eval_loader, eval_settings, evaluate


class Hook:
    """A periodic action of the trainer; every method does nothing unless overridden."""

    def before_train(self, trainer) -> None:
        """Once, before the first step of this :meth:`~hafis.engine.trainer.Trainer.train` call."""

    def before_step(self, trainer) -> None:
        """Before every step (``trainer.iteration`` is the step's index)."""

    def after_step(self, trainer, step: StepOutput) -> None:
        """After every step (``trainer.iteration`` counts the steps done; ``step`` holds its loss and terms)."""

    def after_train(self, trainer) -> None:
        """Once, after the last step, also when training stops with an error."""

    def due(self, trainer) -> bool:
        """Whether the hook acts after the step just done (:class:`ReplicaSync` runs first when one that needs the
        replicas to agree is due)."""
        return False


def every(trainer, interval: int) -> bool:
    """After a step: every ``interval`` steps, and after the last."""
    return trainer.iteration % interval == 0 or trainer.iteration == trainer.config.train.iterations


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """The published schedule ``lr · (1 - it / max_it) ^ power``."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


class PolyLR(Hook):
    """Before each step ``t``: every parameter group at the poly rate of iteration ``max(t - lr_lag, 0)``
    (:attr:`~hafis.frameworks.Traits.lr_lag`: 1 where the release sets the rate after the step)."""

    def before_step(self, trainer) -> None:
        c = trainer.config
        schedule_it = max(trainer.iteration - trainer.framework.traits.lr_lag, 0)
        for group in trainer.optimizer.param_groups:
            group["lr"] = poly_lr(group["initial_lr"], schedule_it, c.train.iterations, c.optim.poly_power)


class MetricWriter(Hook):
    """Every ``train.log_interval`` steps and after the last: one ``train`` record (rate, loss and the framework's
    terms, seconds per iteration) in ``metrics.jsonl`` and TensorBoard (rank 0 writes); the progress bar."""

    def __init__(self) -> None:
        self.bar: Optional[tqdm] = None
        self.window_start = 0.0

    def before_train(self, trainer) -> None:
        c = trainer.config
        self.bar = tqdm(total=c.train.iterations, initial=trainer.iteration, desc=c.name, dynamic_ncols=True,
                        disable=not (c.train.progress_bar and trainer.dist.is_main))
        self.window_start = time.perf_counter()

    def after_step(self, trainer, step: StepOutput) -> None:
        self.bar.update(1)
        interval = trainer.config.train.log_interval
        if not every(trainer, interval):
            return
        record = {"iteration": trainer.iteration, "lr": trainer.optimizer.param_groups[0]["lr"],
                  "loss": float(step.loss.detach()), **{k: float(v) for k, v in step.terms.items()},
                  "seconds_per_iteration": (time.perf_counter() - self.window_start) / interval}
        self.window_start = time.perf_counter()
        trainer.log.write(record, "train")
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")

    def after_train(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class ReplicaSync(Hook):
    """Under torchrun, after a step at which any of ``before`` is due: rank 0's BatchNorm buffers on every rank
    (DDP broadcasts them only before a forward pass), a check that every rank holds the same networks, teachers and
    :meth:`~hafis.frameworks.Framework.replicated_modules`, and every rank's
    :meth:`~hafis.frameworks.Framework.rank_state` in ``trainer.rank_states`` (None on one process)."""

    def __init__(self, before: Sequence[Hook]) -> None:
        self.before = tuple(before)

    def after_step(self, trainer, step: StepOutput) -> None:
        trainer.rank_states = None
        if trainer.dist.enabled and any(hook.due(trainer) for hook in self.before):
            trainer.rank_states = self.sync(trainer)

    @staticmethod
    def sync(trainer) -> Optional[list]:
        fw = trainer.framework
        modules = [trainer.model, *(distributed.unwrap(getattr(fw, n)) for n in fw.traits.networks), *fw.teachers()]
        modules = list({id(m): m for m in modules}.values())
        for module in modules:
            distributed.broadcast_buffers(module)
        for module in modules + fw.replicated_modules():
            distributed.check_replicas(module, trainer.device)
        state = fw.rank_state()
        return None if state is None else distributed.gather_objects(state)


class Evaluation(Hook):
    """Every ``train.eval_interval`` steps and after the last: the mIoU of the framework's model on the validation
    split (and of each of its ``eval_models()``), the best mIoU so far, the pseudo-label diagnostics
    (``eval.diagnostics_images``); one ``eval`` record; the result in ``trainer.last_eval``."""

    def __init__(self, trainer) -> None:
        self.loader = build_eval_loader(trainer.val_source, trainer.config.eval.batch_size,
                                        trainer.config.data.num_workers, trainer.dist.rank, trainer.dist.world_size)
        #: images, ground truth and box masks probed by the diagnostics, loaded once
        self._probe: Optional[tuple] = None

    def due(self, trainer) -> bool:
        return every(trainer, trainer.config.train.eval_interval)

    def after_step(self, trainer, step: StepOutput) -> None:
        if self.due(trainer):
            trainer.last_eval = self.evaluate(trainer)

    def _miou(self, trainer, model) -> EvalResult:
        return evaluate(distributed.unwrap(model), self.loader, trainer.num_classes, trainer.device,
                        **eval_settings(trainer.config))

    def evaluate(self, trainer) -> EvalResult:
        fw, c = trainer.framework, trainer.config
        main_model = fw.eval_model()
        result = self._miou(trainer, main_model)
        trainer.best_miou = max(trainer.best_miou, result.miou)
        others = {name: result.miou if model is main_model else self._miou(trainer, model).miou
                  for name, model in fw.eval_models().items()}
        record = {"iteration": trainer.iteration, "event": "eval", **result.record(), "best_miou": trainer.best_miou,
                  "seed": c.seed, "iou_by_class": dict(zip(trainer.class_names, result.iou, strict=True)),
                  "labelled": len(trainer.labelled_source), "unlabelled": len(trainer.unlabelled_source)}
        if others:  # every evaluated network's mIoU (miou: the run's model); best_network names the highest
            record.update({f"miou_{name}": miou for name, miou in others.items()})
            record["best_network"] = max(others.items(), key=lambda kv: kv[1])[0]
        # a fully supervised run has no unlabelled image to measure pseudo-labels on
        if c.eval.diagnostics_images > 0 and len(trainer.unlabelled_source) > 0 and trainer.dist.is_main:
            record["diagnostics"] = self.diagnostics(trainer)
        trainer.log.write(record, "val")
        return result

    def diagnostics(self, trainer) -> dict:
        """Pseudo-label quality on a fixed set of unlabelled images (:mod:`hafis.engine.diagnostics`), whose ground
        truth is read from the source; measured only: it draws no random numbers and changes no state, so training
        is the same with it on or off."""
        from .diagnostics import load_images, pseudo_label_quality

        if self._probe is None:
            n = min(trainer.config.eval.diagnostics_images, len(trainer.unlabelled_source))
            images, gt = load_images(trainer.unlabelled_source, range(n))
            boxes = trainer.box_masks.batch(range(n)) if trainer.box_masks is not None else None
            self._probe = (images, gt, boxes, n)
        images, gt, boxes, n = self._probe
        stats = pseudo_label_quality(trainer.framework, images, gt, trainer.config.eval.batch_size, box_masks=boxes)
        return {"images": n, **{k: None if math.isnan(v) else v for k, v in stats.items()}}


class Checkpointer(Hook):
    """Every ``train.checkpoint_interval`` steps (0: at every evaluation) and after the last, on rank 0: the
    trainer's :meth:`~hafis.engine.trainer.Trainer.state_dict` with every rank's framework ``rank_state``
    (``bank_generators``), into the run's rotation of checkpoints."""

    def due(self, trainer) -> bool:
        t = trainer.config.train
        return every(trainer, t.checkpoint_interval if t.checkpoint_interval > 0 else t.eval_interval)

    def after_step(self, trainer, step: StepOutput) -> None:
        if self.due(trainer) and trainer.dist.is_main:
            trainer.checkpoints.save({**trainer.state_dict(), "bank_generators": trainer.rank_states},
                                     trainer.iteration)


class OnEval(Hook):
    """After every evaluation of ``evaluation``: ``trainer.on_eval(trainer, iteration, result)`` when it is set
    (a benchmark measures the model there)."""

    def __init__(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation

    def after_step(self, trainer, step: StepOutput) -> None:
        if trainer.on_eval is not None and self.evaluation.due(trainer):
            trainer.on_eval(trainer, trainer.iteration, trainer.last_eval)


def default_hooks(trainer) -> list[Hook]:
    """The trainer's hooks, in the documented order (the module docstring)."""
    evaluation, checkpointer = Evaluation(trainer), Checkpointer()
    return [PolyLR(), MetricWriter(), ReplicaSync(before=(evaluation, checkpointer)), evaluation, checkpointer,
            OnEval(evaluation)]
