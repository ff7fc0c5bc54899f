"""The supervised baseline: labelled images only, plain cross-entropy (the lower bound every SSL method beats)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from .base import Framework, StepOutput


class Supervised(Framework):
    name = "supervised"
    uses_unlabelled = False

    def train_step(self, labelled: dict, unlabelled: Optional[dict], iteration: int) -> StepOutput:
        out = self.model(labelled["image"])
        loss = F.cross_entropy(out.logits, labelled["mask"], ignore_index=255)
        return StepOutput(loss, {"loss_x": loss.detach()})
