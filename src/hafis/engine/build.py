"""What a run is built on: the device a config names and its segmenter.

Shared by the trainer, ``hafis eval`` and ``hafis detect`` so they agree on both, and kept apart from the trainer so
that the detector step does not import it.
"""

from __future__ import annotations

import torch

from hafis.config import Config, ConfigError
from hafis.models import build_segmenter
from hafis.models.released import ReleasedDeepLabV3Plus

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
    if m.decoder == "released":
        return _released(config, num_classes)
    extra = {} if m.align_corners is None else {"align_corners": m.align_corners}
    if m.name == "deeplabv3plus":  # the keys of its dilated backbone and ASPP head; other segmenters have neither
        extra.update(output_stride=m.output_stride, aspp_channels=m.aspp_channels, multi_grid=m.multi_grid)
    elif m.multi_grid:
        raise ConfigError(f"model.multi_grid is the ResNet layer4 of model.name=deeplabv3plus, not {m.name!r}")
    if m.freeze_encoder:
        if m.name != "dpt":
            raise ConfigError(f"model.freeze_encoder is implemented for model.name=dpt, not {m.name!r}")
        extra.update(freeze_encoder=True)
    if m.aux_weight > 0:
        raise ConfigError(f"model.aux_weight={m.aux_weight}: the auxiliary head belongs to model.decoder=released")
    try:
        return build_segmenter(
            m.name, num_classes, backbone=m.backbone, feature_dim=m.feature_dim, fp_dropout=m.fp_dropout,
            pretrained=m.pretrained, pretrained_path=m.pretrained_path, **extra,
        )
    except ValueError as exc:  # an unknown backbone, a backbone of the other model, a checkpoint of another one
        raise ConfigError(f"model (name={m.name!r}, backbone={m.backbone!r}): {exc}") from None


def _released(config: Config, num_classes: int) -> torch.nn.Module:
    """The U2PL / AEL releases' DeepLabV3+ (``model.decoder: released``); U2PL gets its representation head in it."""
    m = config.model
    bad = [f"{k}={v!r}" for k, v, ok in (
        ("model.name", m.name, m.name == "deeplabv3plus"), ("model.feature_dim", m.feature_dim, m.feature_dim == 256),
        ("model.aspp_channels", m.aspp_channels, m.aspp_channels == 256),
        ("model.align_corners", m.align_corners, m.align_corners in (None, True)),
        ("model.freeze_encoder", m.freeze_encoder, not m.freeze_encoder),
        ("train.framework", config.train.framework, config.train.framework != "unimatch")) if not ok]
    if config.train.framework == "u2pl" and config.u2pl.rep_dim != 256:
        bad.append(f"u2pl.rep_dim={config.u2pl.rep_dim}")
    if bad:
        raise ConfigError(f"model.decoder=released is the U2PL / AEL network (DeepLabV3+, 256-channel decoder and "
                          f"representation, align_corners, no feature perturbation); it does not fit {', '.join(bad)}")
    try:
        return ReleasedDeepLabV3Plus(
            num_classes, backbone=m.backbone, output_stride=m.output_stride, multi_grid=m.multi_grid,
            aux_head=m.aux_weight > 0, representation=config.train.framework == "u2pl", pretrained=m.pretrained,
            pretrained_path=m.pretrained_path)
    except ValueError as exc:
        raise ConfigError(f"model (decoder=released, backbone={m.backbone!r}): {exc}") from None
