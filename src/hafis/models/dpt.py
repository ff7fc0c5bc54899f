"""DPT on a DINOv2 ViT (UniMatch V2's segmenter): a patch-14 Vision Transformer and a DPT decoder.

Encoder: timm's ``vit_{small,base,large}_patch14_dinov2`` (``dinov2_small`` / ``_base`` / ``_large``), whose
parameter names are those of Meta's released ``dinov2_vit{s,b,l}14_pretrain.pth`` (which adds only the unused
``mask_token``), so the released file loads strictly (:func:`load_dinov2_weights`). Four intermediate blocks are read
((2, 5, 8, 11) for S/B, (4, 11, 17, 23) for L), each through the final LayerNorm, without the class token, as a
``(B, D, H/14, W/14)`` map. The position embedding stays at the pretraining grid (37 x 37) and is resized to the
input's grid at every forward the way DINOv2 does it (bicubic, scale factor ``(grid + 0.1) / 37``), so a crop of any
multiple of 14 uses the pretrained embedding. ``dinov2_tiny`` is a four-block, 32-wide encoder for tests and CPU runs.

Decoder (DPT, Ranftl et al. 2021, as UniMatch V2 releases it): per level a 1x1 projection to ``out_channels``, a
resize to strides 14/4, 14/2, 14 and 28 (4x and 2x transposed convolutions, identity, a stride-2 3x3 convolution),
a 3x3 convolution to ``features`` channels; RefineNet fusion from the coarsest level up (residual units, bilinear
x2 with ``align_corners=True``, 1x1 convolution); then a 3x3 convolution and ReLU, whose output (``features``
channels, stride 14/8) is the feature the weighting reads, and a 1x1 classifier. Logits are resized to the input.

Inputs that are not a multiple of 14 (whole-image evaluation) are resized to the nearest multiple and the logits
resized back, as UniMatch V2 evaluates; training crops are multiples of 14 (the config checks it), so training
sees no resize. ``feature_mask`` multiplies every encoder feature channel-wise per image (UniMatch V2's
complementary dropout; the framework draws it); ``feature_perturbation`` is UniMatch's Dropout2d on the encoder
features, as on the other segmenters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hafis.models.deeplabv3plus import SegOutput

__all__ = ["DINOV2_ENCODERS", "DPT", "DinoV2Encoder", "EncoderSpec", "load_dinov2_weights"]

PATCH = 14


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str
    layers: tuple[int, ...]
    #: the decoder's per-level widths (UniMatch V2's model_configs)
    out_channels: tuple[int, ...]
    #: Meta's released file (https://dl.fbaipublicfiles.com/dinov2/<stem>/<stem>_pretrain.pth); None = no weights
    meta_file: Optional[str] = None
    overrides: Optional[dict] = None


DINOV2_ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_small": EncoderSpec("vit_small_patch14_dinov2", (2, 5, 8, 11), (48, 96, 192, 384), "dinov2_vits14"),
    "dinov2_base": EncoderSpec("vit_base_patch14_dinov2", (2, 5, 8, 11), (96, 192, 384, 768), "dinov2_vitb14"),
    "dinov2_large": EncoderSpec("vit_large_patch14_dinov2", (4, 11, 17, 23), (256, 512, 1024, 1024),
                                "dinov2_vitl14"),
    "dinov2_tiny": EncoderSpec("vit_small_patch14_dinov2", (0, 1, 2, 3), (8, 16, 32, 32),
                               overrides=dict(embed_dim=32, depth=4, num_heads=2, img_size=56)),
}

#: a key of Meta's files that the encoder has no use for (DINOv2's masked-image-modelling token)
UNUSED_META_KEYS = ("mask_token",)


def meta_url(stem: str) -> str:
    return f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth"


class DinoV2Encoder(nn.Module):
    """A timm DINOv2 ViT whose forward returns the normalised patch tokens of ``layers`` as ``(B, D, h, w)`` maps.

    ``self.model`` keeps timm's (= Meta's) parameter names; only its patch embedding, position embedding, blocks
    and final norm are used.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = spec.layers
        self.embed_dim = int(model.embed_dim)
        #: side of the grid the position embedding was trained on (518 / 14 = 37 for Meta's files)
        self.grid = int(math.isqrt(model.pos_embed.shape[1] - 1))

    def position_embedding(self, h: int, w: int) -> Tensor:
        """The position embedding for an ``h x w`` patch grid (DINOv2's bicubic resize with its 0.1 offset)."""
        pos = self.model.pos_embed
        if h == w == self.grid:
            return pos
        grid = pos[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic",
                             antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        m = self.model
        tokens = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h, w)
        out = []
        for i, block in enumerate(m.blocks[:max(self.layers) + 1]):
            tokens = block(tokens)
            if i in self.layers:
                out.append(m.norm(tokens)[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return out


def build_dinov2(name: str, pretrained: Optional[str] = None, pretrained_path=None) -> DinoV2Encoder:
    """The encoder ``name`` of :data:`DINOV2_ENCODERS`: random, timm's DINOv2 weights (``pretrained='dinov2'``,
    needs the network or timm's cache) or Meta's file at ``pretrained_path`` (wins over ``pretrained``)."""
    if name not in DINOV2_ENCODERS:
        raise ValueError(f"unknown dpt encoder {name!r}; valid names: {', '.join(DINOV2_ENCODERS)}")
    if pretrained not in (None, "dinov2"):
        raise ValueError(f"the dpt segmenter takes pretrained: dinov2 or null, got {pretrained!r}")
    spec = DINOV2_ENCODERS[name]
    wanted = pretrained_path is not None or pretrained == "dinov2"
    if wanted and spec.meta_file is None:
        raise ValueError(f"encoder {name!r} has no pretrained weights; use pretrained: null and no pretrained_path")
    kwargs = dict(spec.overrides or {}, num_classes=0)
    if pretrained_path is not None:
        path = os.fspath(pretrained_path)
        if not os.path.isfile(path):
            raise ValueError(f"model.pretrained_path {path} does not exist: place Meta's {spec.meta_file}_pretrain.pth "
                             f"there ({meta_url(spec.meta_file)})")
    if pretrained == "dinov2" and pretrained_path is None:
        from hafis.models.backbones import check_fetchable

        try:
            check_fetchable(spec.timm_name, f"encoder {name!r}")  # no network: at once, not after retries
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as e:  # network, hub or cache errors all mean the same to the user
            raise ValueError(
                f"could not fetch the DINOv2 weights of {name!r} through timm ({type(e).__name__}); download "
                f"{meta_url(spec.meta_file)} and set model.pretrained_path to the {spec.meta_file}_pretrain.pth "
                "file") from None
        return DinoV2Encoder(spec, model)
    encoder = DinoV2Encoder(spec, timm.create_model(spec.timm_name, pretrained=False, **kwargs))
    if pretrained_path is not None:
        load_dinov2_weights(encoder, pretrained_path)
    return encoder


def load_dinov2_weights(encoder: DinoV2Encoder, path) -> None:
    """Load Meta's ``dinov2_vit*14_pretrain.pth`` (or a checkpoint whose ``backbone.*`` keys have that layout, e.g.
    a UniMatch V2 release) strictly: every tensor is used (``mask_token`` is known and dropped), none is missing,
    a shape mismatch names the key; ValueError otherwise."""
    from hafis.models.backbones import _clean_state_dict, check_keys, read_weights

    path = os.fspath(path)
    state = _clean_state_dict(read_weights(path), path, ())
    state = {k: v for k, v in state.items() if k not in UNUSED_META_KEYS}
    target = encoder.model.state_dict()
    check_keys(path, state, target.keys(), "DINOv2 encoder (Meta's dinov2_vit*14_pretrain.pth layout)")
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise ValueError(f"checkpoint {path}: '{key}' has shape {tuple(value.shape)}, the encoder's is "
                             f"{tuple(target[key].shape)} (another DINOv2 size?)")
    encoder.model.load_state_dict(state, strict=True)


class _ResidualUnit(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` (RefineNet's residual convolution unit, no normalisation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    """Adds the residual-refined skip to the coarser path, refines, upsamples (to ``size`` or x2), 1x1 conv.
    The coarsest block has no skip input, hence no skip unit (the release builds one and never calls it)."""

    def __init__(self, channels: int, skip: bool = True) -> None:
        super().__init__()
        self.skip = _ResidualUnit(channels) if skip else None
        self.refine = _ResidualUnit(channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None, size=None) -> Tensor:
        if skip is not None:
            x = x + self.skip(skip)
        x = self.refine(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out(x)


class DPTHead(nn.Module):
    def __init__(self, embed_dim: int, out_channels: tuple[int, ...], features: int, num_classes: int) -> None:
        super().__init__()
        c = out_channels
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, ci, 1) for ci in c)
        self.resize = nn.ModuleList([nn.ConvTranspose2d(c[0], c[0], 4, stride=4), nn.ConvTranspose2d(c[1], c[1], 2,
                                     stride=2), nn.Identity(), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1)])
        self.reduce = nn.ModuleList(nn.Conv2d(ci, features, 3, padding=1, bias=False) for ci in c)
        #: fusion[i] ends at level i (0 = the finest, stride 14/4)
        self.fusion = nn.ModuleList(_Fusion(features, skip=i < len(c) - 1) for i in range(len(c)))
        self.output = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(features, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        levels = [red(res(proj(f)))
                  for f, proj, res, red in zip(feats, self.project, self.resize, self.reduce, strict=True)]
        path = self.fusion[3](levels[3], size=levels[2].shape[-2:])
        for i in (2, 1):
            path = self.fusion[i](path, levels[i], size=levels[i - 1].shape[-2:])
        features = self.output(self.fusion[0](path, levels[0]))
        return self.classifier(features), features


class DPT(nn.Module):
    """DINOv2 + DPT with the segmenter interface of :class:`~hafis.models.DeepLabV3Plus` (``forward(x,
    feature_perturbation=False, feature_mask=None) -> SegOutput``, ``param_groups``). ``feature_dim`` is the DPT
    width ``features`` (UniMatch V2: 64 for S, 128 for B, 256 for L)."""

    #: training crops and sliding windows must be multiples of this (the config checks it)
    input_multiple = PATCH
    backbones = tuple(DINOV2_ENCODERS)
    config_keys = ("freeze_encoder",)

    def __init__(self, num_classes: int, backbone: str = "dinov2_small", feature_dim: int = 64,
                 fp_dropout: float = 0.5, pretrained: Optional[str] = None, pretrained_path=None,
                 align_corners: bool = True, freeze_encoder: bool = False) -> None:
        super().__init__()
        if not align_corners:
            raise ValueError("the dpt segmenter resizes with align_corners=True (as released); leave "
                             "model.align_corners null")
        self.align_corners = True
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.backbone = build_dinov2(backbone, pretrained, pretrained_path)
        self.head = DPTHead(self.backbone.embed_dim, DINOV2_ENCODERS[backbone].out_channels, feature_dim,
                            num_classes)
        self.fp_dropout = nn.Dropout2d(fp_dropout)
        if freeze_encoder:
            self.backbone.requires_grad_(False)

    def forward(self, x: Tensor, feature_perturbation: bool = False,
                feature_mask: Optional[Tensor] = None) -> SegOutput:
        size = tuple(x.shape[-2:])
        inner = tuple(max(1, int(s / PATCH + 0.5)) * PATCH for s in size)
        if inner != size:
            x = F.interpolate(x, size=inner, mode="bilinear", align_corners=True)
        feats = self.backbone(x)
        if feature_mask is not None:
            feats = [f * feature_mask[:, :, None, None].to(f.dtype) for f in feats]
        if feature_perturbation:
            feats = [torch.cat([f, self.fp_dropout(f)]) for f in feats]
        logits, features = self.head(feats)
        logits = F.interpolate(logits, size=inner, mode="bilinear", align_corners=True)
        if inner != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        if not feature_perturbation:
            return SegOutput(logits=logits, features=features)
        logits, logits_fp = logits.chunk(2)
        return SegOutput(logits=logits, features=features.chunk(2)[0], logits_fp=logits_fp)

    def param_groups(self, lr: float, head_lr_multiplier: float = 40.0, weight_decay: float = 0.01) -> list[dict]:
        """Encoder at ``lr``, decoder at ``lr * multiplier`` (UniMatch V2: 5e-6 and x40); frozen parameters left
        out; ``initial_lr`` for the poly schedule."""
        encoder_ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in encoder_ids and p.requires_grad]
        encoder = [p for p in self.backbone.parameters() if p.requires_grad]
        head_lr = lr * head_lr_multiplier
        groups = [dict(params=head, lr=head_lr, initial_lr=head_lr, weight_decay=weight_decay)]
        if encoder:
            groups.insert(0, dict(params=encoder, lr=lr, initial_lr=lr, weight_decay=weight_decay))
        return groups
