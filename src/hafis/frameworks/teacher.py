"""The mean teacher shared by U2PL, AEL and AugSeg: an exponential moving average (EMA) of the student.

One helper for the three frameworks (none keeps a copy of its own):

* the teacher is a ``deepcopy`` of the student network (for U2PL, of the student *and* its representation head), its
  parameters never require gradients and it always runs in ``eval()`` mode, under ``no_grad``;
* ``update(student, decay)`` is the published arithmetic ``θ_t ← decay · θ_t + (1 − decay) · θ_s``, applied to every
  parameter in place;
* :meth:`warmup_decay` is the warm-up form the released codes use, ``min(1 − 1 / (step + 1), decay)``: the first
  update (step 0) copies the student, the second averages the two equally, and so on until ``decay`` is reached.

**Buffers (BatchNorm running statistics) are EMA'd with the same decay** (integer buffers such as
``num_batches_tracked`` are copied). This is AugSeg's released rule. U2PL's and AEL's released teachers average the
parameters only and keep BatchNorm statistics of their own, collected by running the teacher in ``train()`` mode
(batch statistics, dropout active) on every batch (AEL for every teacher pass, U2PL for the pass that feeds its
contrastive loss; its pseudo-labels come from an eval-mode pass). hafis's teacher never runs in train mode, so that
its outputs depend on its weights alone: not on which images share its batch (batch statistics, which with one or
two images per GPU are noisy) nor on a dropout draw (the released U2PL / AEL decoder, ``model.decoder: released``,
has ``Dropout2d(0.1)`` layers; hafis's own DeepLabV3+ has none outside the feature perturbation). It therefore needs
statistics from somewhere and takes the student's, averaged like the weights. ``buffers="copy"`` (copy the
student's) is available too.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hafis.config import Config

from .base import Framework, FrameworkContext

BUFFER_MODES = ("ema", "copy")


class EMATeacher:
    """An EMA copy of ``student``. Call it like the network (``teacher(x)``): eval mode, no gradient."""

    def __init__(self, student: nn.Module, buffers: str = "ema") -> None:
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.buffers = buffers
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    @staticmethod
    def warmup_decay(step: int, decay: float) -> float:
        """``min(1 − 1 / (step + 1), decay)`` (U2PL, AEL and AugSeg's warm-up); ``step`` counts EMA updates from 0."""
        return min(1.0 - 1.0 / (step + 1), decay)

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """``θ_t ← decay · θ_t + (1 − decay) · θ_s`` for every parameter; float buffers the same (or copied)."""
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            if self.buffers == "ema" and t.is_floating_point():
                t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
            else:
                t.copy_(s.detach())

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student, parameters and buffers (U2PL, when its supervised-only
        phase ends)."""
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.copy_(s.detach())
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            t.copy_(s.detach())

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.module.eval()
        return self.module(*args, **kwargs)

    def to(self, device: torch.device) -> "EMATeacher":
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class MeanTeacherFramework(Framework):
    """What U2PL, AEL and AugSeg share: the student, its :class:`EMATeacher`, and a framework-owned generator.

    Every random draw of these recipes (CutMix boxes, sampled classes, augmentation ops, contrastive samples) comes
    from ``self.generator`` (a CPU ``torch.Generator`` seeded with ``config.seed``), never from the global RNG, so
    turning the weighting on or off changes no draw; its state is checkpointed, so a resumed run replays them.
    ``eval_model()`` is the teacher once it has received an EMA update (the three evaluate and release the
    teacher), before that the student.
    """

    traits = replace(Framework.traits, networks=("model", "student"))

    def __init__(self, config: Config, model: nn.Module, ctx: FrameworkContext,
                 student: Optional[nn.Module] = None) -> None:
        super().__init__(config, model, ctx)
        self.student = model if student is None else student
        self.teacher = EMATeacher(self.student)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        #: EMA updates the teacher has received (0 during U2PL's supervised-only phase)
        self.ema_updates = 0

    # ------------------------------------------------------------------------------------------ helpers
    def teachers(self) -> list[nn.Module]:
        return [self.teacher.module]

    def teacher_segmenter(self) -> nn.Module:
        return self.teacher.module

    def eval_model(self) -> nn.Module:
        return self.teacher_segmenter() if self.ema_updates > 0 else self.model

    def update_teacher(self, decay: float) -> None:
        self.teacher.update(self.student, decay)
        self.ema_updates += 1

    def rand(self, *shape: int, device: Optional[torch.device] = None) -> Tensor:
        """``U[0, 1)`` draws from the framework's generator, on ``device``."""
        out = torch.rand(shape, generator=self.generator)
        return out if device is None else out.to(device)

    def randint(self, low: int, high: int, *shape: int, device: Optional[torch.device] = None) -> Tensor:
        out = torch.randint(low, high, shape, generator=self.generator)
        return out if device is None else out.to(device)

    def epoch_length(self) -> int:
        if self.ctx.epoch_length is None:
            raise ValueError(f"{self.name}: the epoch length is unknown (the context's, which the trainer takes from "
                             "the unlabelled set); give the iteration count in the config instead")
        return self.ctx.epoch_length

    # ------------------------------------------------------------------------------------------- plumbing
    def to(self, device: torch.device) -> "MeanTeacherFramework":
        super().to(device)
        self.student.to(device)
        self.teacher.to(device)
        return self

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict(),
                "generator": self.generator.get_state(), "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
        self.generator.set_state(state["generator"])
        self.ema_updates = int(state["ema_updates"])


def softmax_entropy(prob: Tensor, eps: float = 1e-10) -> Tensor:
    """``-Σ_c p_c log(p_c + eps)`` over dim 1 (the released codes' form)."""
    return -(prob * torch.log(prob + eps)).sum(dim=1)
