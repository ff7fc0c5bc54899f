"""What a run is built on: the device a config names and its segmenter.

Shared by the trainer, ``hafis eval`` and ``hafis detect`` so they agree on both, and kept apart from the trainer so
that the detector step does not import it.
"""

from __future__ import annotations

import torch

from hafis.config import Config, ConfigError
from hafis.models import build_segmenter

__all__ = ["build_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(config: Config, num_classes: int) -> torch.nn.Module:
    """The config's segmenter; a model key that does not fit it becomes a :class:`ConfigError` naming the model."""
    m = config.model
    extra = {} if m.align_corners is None else {"align_corners": m.align_corners}
    if m.name == "deeplabv3plus":  # the keys of its dilated backbone and ASPP head; other segmenters have neither
        extra.update(output_stride=m.output_stride, aspp_channels=m.aspp_channels)
    if m.freeze_encoder:
        if m.name != "dpt":
            raise ConfigError(f"model.freeze_encoder is implemented for model.name=dpt, not {m.name!r}")
        extra.update(freeze_encoder=True)
    try:
        return build_segmenter(
            m.name, num_classes, backbone=m.backbone, feature_dim=m.feature_dim, fp_dropout=m.fp_dropout,
            pretrained=m.pretrained, pretrained_path=m.pretrained_path, **extra,
        )
    except ValueError as exc:  # an unknown backbone, a backbone of the other model, a checkpoint of another one
        raise ConfigError(f"model (name={m.name!r}, backbone={m.backbone!r}): {exc}") from None
