"""The optimiser of a run: SGD (the four DeepLabV3+ frameworks, as published) or AdamW (Transformer segmenters:
SegFormer, AllSpark and UniMatch V2 train with AdamW). Parameter groups carry their own ``lr`` / ``initial_lr`` /
``weight_decay`` (the segmenter's ``param_groups``), so the poly schedule works the same for both."""

from __future__ import annotations

import torch


def _sgd(groups: list[dict], o) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _adamw(groups: list[dict], o) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


#: ``optim.name`` -> ``(parameter groups, optim config) -> optimiser``; a new optimiser is one entry
OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def build_optimizer(groups: list[dict], optim_config) -> torch.optim.Optimizer:
    name = getattr(optim_config, "name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](groups, optim_config)


__all__ = ["OPTIMIZERS", "build_optimizer"]
