"""What a run is built on: the device a config names and its segmenter.

Shared by the trainer, ``hafis eval`` and ``hafis detect`` so they agree on both, and kept apart from the trainer so
that the detector step does not import it.
"""

from __future__ import annotations

import torch

from hafis.config import Config, ConfigError
from hafis.models import SEGMENTERS, build_segmenter
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
    extra.update(segmenter_keys(m))
    if m.aux_weight > 0:
        raise ConfigError(f"model.aux_weight={m.aux_weight}: the auxiliary head belongs to model.decoder=released")
    try:
        return build_segmenter(
            m.name, num_classes, backbone=m.backbone, feature_dim=m.feature_dim, fp_dropout=m.fp_dropout,
            pretrained=m.pretrained, pretrained_path=m.pretrained_path, **extra,
        )
    except ValueError as exc:  # an unknown backbone, a backbone of the other model, a checkpoint of another one
        raise ConfigError(f"model (name={m.name!r}, backbone={m.backbone!r}): {exc}") from None


def segmenter_keys(m) -> dict:
    """The ``model`` keys only ``model.name``'s segmenter takes (its ``config_keys``), by name. Another segmenter's
    sizes are ignored (one set of overrides may serve several models), but its switches turned on (``multi_grid``,
    ``freeze_encoder``) are a :class:`ConfigError` naming the segmenters that have them."""
    takes = SEGMENTERS[m.name].config_keys
    for key in sorted({k for s in SEGMENTERS.values() for k in s.config_keys} - set(takes)):
        if getattr(m, key) is True:
            owners = [n for n, s in SEGMENTERS.items() if key in s.config_keys]
            raise ConfigError(f"model.{key}={getattr(m, key)!r} is a key of model.name={'/'.join(owners)}, not of "
                              f"{m.name!r}")
    return {key: getattr(m, key) for key in takes}


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
