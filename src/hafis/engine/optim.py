"""The optimiser of a run: SGD (the four DeepLabV3+ frameworks, as published) or AdamW (Transformer segmenters:
SegFormer, AllSpark and UniMatch V2 train with AdamW). Parameter groups carry their own ``lr`` / ``initial_lr`` /
``weight_decay`` (the segmenter's ``param_groups``), so the poly schedule works the same for both."""

from __future__ import annotations

import torch


def build_optimizer(groups: list[dict], optim_config) -> torch.optim.Optimizer:
    o = optim_config
    name = getattr(o, "name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimiser {name!r}; valid: sgd, adamw")


__all__ = ["build_optimizer"]
