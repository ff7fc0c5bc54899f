"""SegFormer (Xie et al., NeurIPS 2021): a hierarchical Transformer encoder and a light all-MLP decoder.

The encoder is timm's ``PyramidVisionTransformerV2``. SegFormer's Mix Transformer (MiT) is the same network as
PVTv2 (overlapping patch embeddings 7x7/4 then 3x3/2, spatial-reduction attention, a depth-wise 3x3 convolution
inside the MLP) with an MLP ratio of 4 in every stage, so ``mit_b0`` ... ``mit_b5`` here are PVTv2 modules with
MiT's sizes, and SegFormer's released ImageNet checkpoints (``mit_b5.pth``: ``patch_embed1.*``, ``block1.0.*``,
``norm1.*``) load into them through timm's key conversion (``model.pretrained_path``). ``pvt_v2_b0`` ... ``b5`` are
timm's own PVTv2 (``model.pretrained: imagenet`` downloads timm's weights). ``mit_tiny`` is a few-thousand-parameter
encoder for tests and CPU runs.

The decoder follows SegFormer: a 1x1 projection of each of the four stages to ``feature_dim`` channels, all
upsampled to stride 4, concatenated, fused by 1x1 conv + BN + ReLU (this fused map is the returned feature),
dropout 0.1 and a 1x1 classifier. The interface is :class:`~hafis.models.DeepLabV3Plus`'s: ``forward(x,
feature_perturbation=False) -> SegOutput(logits at input size, features (B, D, ceil(H/4), ceil(W/4)), logits_fp)``,
and ``param_groups(lr, head_lr_multiplier, weight_decay)`` (encoder at ``lr``, decoder at ``lr * multiplier``).
UniMatch's feature perturbation is Dropout2d(``fp_dropout``) on the four encoder features, as it is on DeepLabV3+'s.
"""

from __future__ import annotations

import os
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hafis.models.deeplabv3plus import SegOutput

__all__ = ["ENCODERS", "SegFormer", "build_encoder", "load_encoder_weights"]

_MIT_HEADS = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4))
_WIDE = (64, 128, 320, 512)

#: encoder name -> (timm model, keyword overrides); ``None`` overrides = timm's own configuration (and weights)
ENCODERS: dict[str, tuple[str, Optional[dict]]] = {
    "mit_b0": ("pvt_v2_b0", dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_MIT_HEADS)),
    "mit_b1": ("pvt_v2_b1", dict(embed_dims=_WIDE, depths=(2, 2, 2, 2), **_MIT_HEADS)),
    "mit_b2": ("pvt_v2_b2", dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), **_MIT_HEADS)),
    "mit_b3": ("pvt_v2_b3", dict(embed_dims=_WIDE, depths=(3, 4, 18, 3), **_MIT_HEADS)),
    "mit_b4": ("pvt_v2_b4", dict(embed_dims=_WIDE, depths=(3, 8, 27, 3), **_MIT_HEADS)),
    "mit_b5": ("pvt_v2_b5", dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), **_MIT_HEADS)),
    **{f"pvt_v2_b{i}": (f"pvt_v2_b{i}", None) for i in range(6)},
    "mit_tiny": ("pvt_v2_b0", dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                   sr_ratios=(8, 4, 2, 1), mlp_ratios=(2, 2, 2, 2))),
}


class Encoder(nn.Module):
    """A PVTv2 / MiT whose forward returns its four stage outputs ``(B, C_i, H / 2^(i+2), W / 2^(i+2))``.

    The wrapped model keeps timm's parameter names (``model.patch_embed.*``, ``model.stages.N.*``), so a timm or
    converted MiT checkpoint loads with strict key matching.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.channels = [int(s.norm.normalized_shape[0]) for s in model.stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, intermediates_only=True)


def build_encoder(name: str, pretrained: Optional[str] = None, pretrained_path=None,
                  drop_path_rate: float = 0.1) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown SegFormer encoder {name!r}; valid names: {', '.join(ENCODERS)}")
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    timm_name, overrides = ENCODERS[name]
    download = pretrained == "imagenet" and pretrained_path is None
    if download and overrides is not None:
        raise ValueError(
            f"encoder {name!r} has no ImageNet weights in timm: download SegFormer's {name}.pth (NVlabs/SegFormer) "
            "and set model.pretrained_path to it, or use a pvt_v2_bN encoder with pretrained: imagenet")
    kwargs = dict(overrides or {}, num_classes=0, drop_path_rate=drop_path_rate)
    if download:
        from hafis.models.backbones import check_fetchable

        check_fetchable(timm_name, f"encoder {name!r}")
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as e:  # network, hub, cache or file errors all mean the same to the user
            raise ValueError(
                f"could not fetch ImageNet weights for encoder {name!r} (timm {timm_name!r}): {type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}; supply a local file instead with "
                "model.pretrained_path=/path/to/file.pth") from None
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    encoder = Encoder(model)
    if pretrained_path is not None:
        load_encoder_weights(encoder, pretrained_path)
    return encoder


def load_encoder_weights(encoder: Encoder, path) -> None:
    """Load a timm PVTv2 or an original PVTv2 / SegFormer MiT checkpoint, strictly; ValueError names file and keys."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    from hafis.models.backbones import _clean_state_dict, check_keys, read_weights

    path = os.fspath(path)
    state = _clean_state_dict(read_weights(path), path)
    for prefix in ("encoder.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = checkpoint_filter_fn(state, encoder.model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_keys(path, state, encoder.model.state_dict().keys(), "encoder")
    try:
        encoder.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} has the encoder's keys but wrong shapes (another size?): {e}") from e


class SegFormer(nn.Module):
    """SegFormer with the segmenter interface of :class:`~hafis.models.DeepLabV3Plus`.

    ``backbone`` names the encoder (:data:`ENCODERS`); ``feature_dim`` is the decoder width (SegFormer: 256 for B0,
    768 for B1-B5).
    """

    backbones = tuple(ENCODERS)
    config_keys: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int,
        backbone: str = "mit_b5",
        feature_dim: int = 256,
        fp_dropout: float = 0.5,
        decoder_dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        pretrained: Optional[str] = None,
        pretrained_path=None,
        align_corners: bool = False,
    ):
        super().__init__()
        #: bilinear resizes of the decoder and the logits (SegFormer's release: False); the weighting follows it
        self.align_corners = align_corners
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.backbone = build_encoder(backbone, pretrained, pretrained_path, drop_path_rate)
        self.project = nn.ModuleList(nn.Conv2d(c, feature_dim, 1) for c in self.backbone.channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(feature_dim * len(self.project), feature_dim, 1, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(decoder_dropout)
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1)
        self.fp_dropout = nn.Dropout2d(fp_dropout)
        sr = getattr(self.backbone.model.stages[0].blocks[0].attn, "sr", None)
        #: smallest input side the encoder takes (stride 4 times the first spatial-reduction kernel)
        self.min_input = 4 * (sr.kernel_size[0] if sr is not None else 1)
        #: an exported graph (``hafis export``) is dynamic over sides that are multiples of this (its encoder's
        #: shape arithmetic specialises on other sizes)
        self.export_size_multiple = 32

    def _decode(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = feats[0].shape[-2:]
        ups = [proj(f) if i == 0 else F.interpolate(proj(f), size=size, mode="bilinear",
                                                       align_corners=self.align_corners)
               for i, (proj, f) in enumerate(zip(self.project, feats, strict=True))]
        features = self.fuse(torch.cat(ups, dim=1))
        return self.classifier(self.dropout(features)), features

    def forward(self, x: Tensor, feature_perturbation: bool = False) -> SegOutput:
        size = x.shape[-2:]
        feature_size = (-(-size[0] // 4), -(-size[1] // 4))
        # the first stage's spatial-reduction convolution (kernel 8 at stride 4) needs inputs of at least 32 px:
        # smaller ones (tiny tests, thin sliding-window margins) are zero-padded and the outputs cropped back
        pad_h, pad_w = max(0, self.min_input - size[0]), max(0, self.min_input - size[1])
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.backbone(x)
        if feature_perturbation:
            feats = [torch.cat([f, self.fp_dropout(f)]) for f in feats]
        logits, features = self._decode(feats)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        logits, features = logits[..., :size[0], :size[1]], features[..., :feature_size[0], :feature_size[1]]
        if not feature_perturbation:
            return SegOutput(logits=logits, features=features)
        logits, logits_fp = logits.chunk(2)
        features, _ = features.chunk(2)
        return SegOutput(logits=logits, features=features, logits_fp=logits_fp)

    def param_groups(self, lr: float, head_lr_multiplier: float = 10.0, weight_decay: float = 1e-4) -> list[dict]:
        """Encoder at ``lr``, decoder at ``lr * multiplier``; ``initial_lr`` for the poly schedule."""
        encoder_ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in encoder_ids]
        head_lr = lr * head_lr_multiplier
        return [
            dict(params=list(self.backbone.parameters()), lr=lr, initial_lr=lr, weight_decay=weight_decay),
            dict(params=head, lr=head_lr, initial_lr=head_lr, weight_decay=weight_decay),
        ]
