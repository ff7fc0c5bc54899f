"""SSL frameworks as loss recipes on the shared trainer; ``FRAMEWORKS`` maps config names to classes."""

from __future__ import annotations

from torch import nn

from hafis.config import Config

from .ael import AEL
from .augseg import AugSeg
from .base import Framework, FrameworkContext, PseudoLabelWeighting, StepOutput, Traits
from .supervised import Supervised
from .teacher import EMATeacher, MeanTeacherFramework
from .u2pl import U2PL
from .unimatch import UniMatch
from .unimatch_v2 import UniMatchV2

FRAMEWORKS: dict[str, type[Framework]] = {cls.name: cls for cls in (Supervised, UniMatch, U2PL, AEL, AugSeg,
                                                                    UniMatchV2)}


def build_framework(config: Config, model: nn.Module, ctx: FrameworkContext) -> Framework:
    name = config.train.framework
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; valid: {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name](config, model, ctx)


__all__ = ["FRAMEWORKS", "EMATeacher", "Framework", "FrameworkContext", "MeanTeacherFramework", "PseudoLabelWeighting",
           "StepOutput", "Traits", "build_framework"]
