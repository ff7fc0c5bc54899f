"""Experiment configuration: one YAML file per experiment, ``key=value`` overrides, strict validation.

Every key is a field of a dataclass below, so the valid keys, their types and their defaults are documented in one
place. An unknown or mistyped key, a wrong type or a value outside its choices is a :class:`ConfigError` that names
the key (with the file) and lists the valid ones. A YAML file may start from another with ``base: other.yaml``
(relative to the file), so paper settings share one base per dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from hafis.data.synthetic import SyntheticConfig


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and where it came from."""


def choice(default: Any, *choices: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


@dataclass
class DataConfig:
    dataset: str = choice("synthetic", "synthetic")
    root: Optional[str] = None
    crop_size: int = 64
    #: random scale range of the weak augmentation (published: 0.5-2.0)
    scale_range: tuple[float, float] = (0.5, 2.0)
    num_workers: int = 0
    #: where generated / rasterised data is cached; ``null`` = ``$HAFIS_CACHE`` or ``~/.cache/hafis``
    cache_dir: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: str = choice("deeplabv3plus", "deeplabv3plus")
    backbone: str = "resnet50"
    #: ``imagenet`` loads the backbone's ImageNet weights through timm; ``null`` starts from scratch
    pretrained: Optional[str] = choice(None, None, "imagenet")
    #: a local backbone checkpoint (for machines with no network); wins over ``pretrained``
    pretrained_path: Optional[str] = None
    output_stride: int = choice(16, 8, 16)
    feature_dim: int = 256
    #: channels of the ASPP branches (256 as published; smaller for the tiny CPU configs)
    aspp_channels: int = 256
    #: UniMatch's feature perturbation: Dropout2d rate on the encoder features
    fp_dropout: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 0.001
    #: the published recipes train the randomly initialised head 10x faster than the pretrained backbone
    head_lr_multiplier: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9


@dataclass
class TrainConfig:
    framework: str = choice("unimatch", "supervised", "unimatch")
    iterations: int = 1000
    batch_size: int = 8
    unlabelled_batch_size: int = 8
    eval_interval: int = 100
    log_interval: int = 10
    #: checkpoints are written at every evaluation and at the end; the newest ``keep_checkpoints`` are kept
    keep_checkpoints: int = 2
    progress_bar: bool = True
    tensorboard: bool = True
    device: str = choice("auto", "auto", "cpu", "cuda")


@dataclass
class UniMatchConfig:
    #: τ: pseudo-labels with weak-view confidence below it do not count (published: 0.95 VOC, 0 Cityscapes)
    threshold: float = 0.95
    cutmix_prob: float = 0.5
    #: the published loss is (loss_x + 0.25 loss_s1 + 0.25 loss_s2 + 0.5 loss_fp) / 2
    strong_weight: float = 0.25
    fp_weight: float = 0.5


@dataclass
class WeightingConfig:
    enabled: bool = False
    k: int = 5
    #: 0 = the paper's W = s/k; 1 = the authors' released code, W = 1 + s/k
    offset: float = 0.0
    #: count = the framework's own normaliser (paper); weight = divide by the sum of W (authors' code)
    normalize: str = choice("count", "count", "weight")
    memory_per_class: int = 256
    #: pixels of each class pushed into the bank per batch (a few per image)
    samples_per_class: int = 32
    #: labelled pixels feed the bank when predicted right with confidence above this (the paper: 0.95)
    labelled_threshold: float = 0.95
    #: how unlabelled pixels are judged reliable for the bank: confidence ≥ tau_seg alone (until detections
    #: are available, and as the ablation)
    reliable: str = choice("confidence", "confidence")
    tau_seg: float = 0.95
    #: features are resized to the labels' size: bilinear (authors) or nearest (cheaper)
    align: str = choice("bilinear", "bilinear", "nearest")


@dataclass
class EvalConfig:
    batch_size: int = 8
    mode: str = choice("whole", "whole")


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    #: where checkpoints, metrics.jsonl and TensorBoard logs go; ``{name}`` is replaced by the name
    output_dir: str = "runs/{name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unimatch: UniMatchConfig = field(default_factory=UniMatchConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


# ------------------------------------------------------------------------------------------------- loading
def load_config(path: Union[str, Path, None] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; ``None`` = all defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        raw = _read_yaml(Path(path))
        source = str(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from None
        _set_dotted(raw, key.strip(), value)
    return from_dict(Config, raw, source)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(cls: type, raw: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, checking every key and type; errors name ``prefix.key`` and ``source``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{source}: unknown key '{prefix}{key}'{hint}; valid keys of "
            f"'{prefix.rstrip('.') or 'config'}': {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = from_dict(typ, raw[name], source, key + ".")
            continue
        value = _coerce(raw[name], typ, key, source)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}")
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}': {exc}") from None


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(typ)
    if ok is None:
        return value
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {typ.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if typ is float else value


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
