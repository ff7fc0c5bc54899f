"""The supervised baseline: labelled images only, cross-entropy or OHEM (``loss.labelled``; the lower bound every SSL
method beats)."""

from __future__ import annotations

from typing import Optional

from .base import Framework, LabelledBatch, StepOutput, Traits, UnlabelledBatch
from .losses import labelled_loss


class Supervised(Framework):
    name = "supervised"
    traits = Traits(uses_unlabelled=False)

    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        out = self.model(labelled["image"])
        loss = labelled_loss(out.logits, out.aux, labelled["mask"], self.config)
        return StepOutput(loss, {"loss_x": loss.detach()})
