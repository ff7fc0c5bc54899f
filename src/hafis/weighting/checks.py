"""Input checks of the weighting plug-in: wrong shapes, label values or k are errors that name the argument."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_features_labels(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    ignore_index: int,
    labels_name: str = "labels",
    feature_dim: Optional[int] = None,
    mask: Optional[Tensor] = None,
    mask_name: str = "mask",
) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a float tensor, got {features.dtype}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise ValueError(f"features have D={features.shape[1]} channels, expected feature_dim={feature_dim}")
    check_labels(labels, num_classes, ignore_index, labels_name)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{labels_name} has batch size {labels.shape[0]} but features have {features.shape[0]}"
        )
    if mask is not None and tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"{mask_name} must have the shape of {labels_name} {tuple(labels.shape)}, "
                         f"got {tuple(mask.shape)}")


def check_labels(labels: Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    if labels.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name} contains {value}, outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )


def check_k(k: int, dim: int, name: str = "k") -> None:
    """``k`` top channels out of ``dim``: a positive int no larger than ``dim``."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    if k > dim:
        raise ValueError(f"{name}={k} is larger than the feature dimension D={dim}")
