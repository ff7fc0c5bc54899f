"""Experiment configuration: one YAML file per experiment, ``key=value`` overrides, strict validation.

Every key is a field of a dataclass below, so the valid keys, their types and their defaults are documented in one
place. An unknown or mistyped key, a wrong type, a value outside its choices or its declared range, or a broken
relation between keys (:mod:`hafis.fields`: ``k`` at most ``model.feature_dim``, a low <= high pair) is a
:class:`ConfigError` that names the key (with the file), the value and what is allowed. Every whole-number key
has an upper bound too (seeds below 2^63, sizes below what overflows a tensor, workers a multiple of the cores). A
key that may be null takes ``null`` / ``~`` and, from a command line, ``none`` (a path key keeps the word as a
name); messages list null as ``null``. A YAML file may start from another with ``base: other.yaml`` (relative to
the file), so paper settings share one base per dataset.
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

from hafis.data.garments import GarmentsConfig
from hafis.data.synthetic import SyntheticConfig
from hafis.errors import UserError, short
from hafis.fields import (
    NULL_WORDS,
    PerCPU,
    RegistryNames,
    bounded,
    choice,
    is_runtime,
    nonneg,
    positive,
    range_error,
    registry,
    relation_errors,
    runtime,
    seed_value,
    show_choices,
    unit,
)


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message names the key and where it came from."""


#: a config is a few KB; a file far larger is not one (and must not be read into memory whole)
MAX_CONFIG_BYTES = 1 << 20
#: nodes of a YAML document with its aliases expanded; a config has a few hundred, a "billion laughs" file billions
MAX_YAML_NODES = 20000

# Upper bounds of sizes, far above any published setting and below what overflows a tensor's size or an index
#: image sides in pixels (crops, sliding windows, the detector's resize): Cityscapes' 2048 x 4
MAX_SIDE = 8192
#: channels of a layer (published: 256; a ViT-L 1024)
MAX_CHANNELS = 8192
#: images of one batch
MAX_BATCH = 65536
#: training steps and intervals counted in steps
MAX_ITERATIONS = 10**9
#: data-loader worker processes
MAX_WORKERS = PerCPU(8)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short(key)} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _expanded_nodes(node, memo: dict) -> int:
    """Nodes of ``node`` with every alias expanded, counted once per distinct node (linear in the file)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts as one until its own count is known
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded_nodes(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        count = 1
    memo[id(node)] = count
    return count


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` with duplicate keys and alias expansion past :data:`MAX_YAML_NODES` refused as a
    :class:`ConfigError` naming ``source`` (aliases are resolved to shared objects, so a tiny file could otherwise
    stand for billions of values that the first copy or message would expand)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_nodes(node, {})
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{source}: its aliases (*name) expand to {size:.3g} values, more than the "
                              f"{MAX_YAML_NODES} a config may hold")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


@dataclass
class DataConfig:
    #: synthetic = the built-in scenes; garments = Fashion-MNIST garments on real photographs (section
    #: ``garments``); voc / cityscapes / coco / ade20k = the datasets' official trees; folder = your own
    #: ``images/ + masks/ + classes.txt`` (formats: hafis.data.voc, .cityscapes, .coco, .ade20k, .folder)
    dataset: str = registry("synthetic", "hafis.data:DATASETS")
    #: the dataset's folder (VOC: the VOC2012 folder; Cityscapes: holds leftImg8bit/ and gtFine/; COCO: holds
    #: train2017/, val2017/, annotations/; ADE20K: the ADEChallengeData2016 folder)
    root: Optional[str] = None
    #: split files, one image id a line (published lists or ``hafis prepare`` output); relative paths are relative to
    #: ``root``. null: labelled = every image that can be labelled, unlabelled = the other training images,
    #: val = the dataset's validation set
    labelled_split: Optional[str] = None
    unlabelled_split: Optional[str] = None
    val_split: Optional[str] = None
    #: Pascal VOC: classic = labelled from the 1,464 fine masks; blended = from the 10,582 SBD-augmented masks
    voc_setting: str = choice("classic", "classic", "blended")
    #: folder datasets: the class list (one name a line); null = ``root/classes.txt``
    classes: Optional[str] = None
    #: side of the square training crops; at least 16 (the network downsamples by up to 16, CutMix needs room)
    crop_size: int = bounded(64, 16, MAX_SIDE)
    #: random scale range of the weak augmentation (published: 0.5-2.0)
    scale_range: tuple[float, float] = positive((0.5, 2.0), ordered=True)
    num_workers: int = nonneg(0, MAX_WORKERS, runtime=True)
    #: where generated / rasterised data is cached; ``null`` = ``$HAFIS_CACHE`` or ``~/.cache/hafis``
    cache_dir: Optional[str] = runtime(None)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    #: data.dataset: garments: where Fashion-MNIST is, sizes, classes (keys: hafis.data.garments.GarmentsConfig)
    garments: GarmentsConfig = field(default_factory=GarmentsConfig)


@dataclass
class ModelConfig:
    #: deeplabv3plus (ResNet, as the four frameworks publish), segformer (hierarchical Transformer + MLP decoder) or
    #: dpt (DINOv2 ViT + DPT decoder, UniMatch V2's; crops and sliding windows a multiple of 14)
    name: str = registry("deeplabv3plus", "hafis.models:SEGMENTERS")
    #: a name of the segmenter's ``backbones`` (deeplabv3plus: ResNets, resnet_tiny and efficientnet_lite0 for the
    #: CPU; segformer: MiT / PVTv2 encoders; dpt: DINOv2 ViTs; an unknown name lists them)
    backbone: str = registry("resnet50", "hafis.models:BACKBONES_OF", by="name")
    #: ``imagenet`` loads the backbone's ImageNet weights through timm (efficientnet_lite0: from its installed weights
    #: package, no network); ``dinov2`` (dpt) DINOv2's weights through timm; ``null`` starts from scratch
    pretrained: Optional[str] = choice(None, None, "imagenet", "dinov2")
    #: a local backbone checkpoint (for machines with no network; dpt: Meta's dinov2_vit{s,b,l}14_pretrain.pth);
    #: wins over ``pretrained``
    pretrained_path: Optional[str] = None
    #: dpt: the encoder is not trained (UniMatch V2's lock_backbone)
    freeze_encoder: bool = False
    #: deeplabv3plus: the backbone's output stride (16 as published; 8 dilates one more stage); segformer has none
    output_stride: int = choice(16, 8, 16)
    feature_dim: int = positive(256, MAX_CHANNELS)
    #: deeplabv3plus: channels of the ASPP branches (256 as published; smaller for the tiny CPU configs)
    aspp_channels: int = positive(256, MAX_CHANNELS)
    #: UniMatch's feature perturbation: Dropout2d rate on the encoder features
    fp_dropout: float = unit(0.5)
    #: deeplabv3plus: ``unimatch`` = hafis's DeepLabV3+, UniMatch's released network; ``released`` = the U2PL / AEL
    #: releases' decoder (3x3 ASPP projection, 256-channel low-level branch, Dropout2d(0.1), U2PL's representation
    #: head; hafis.models.released), whose checkpoints load into it; feature_dim and aspp_channels are then 256
    decoder: str = choice("unimatch", "unimatch", "released")
    #: ResNet backbones: the releases' multi-grid layer4 (dilations x2, x2, x4: 4, 8, 16 at output stride 8; U2PL,
    #: AEL and AugSeg use it)
    multi_grid: bool = False
    #: ``decoder: released``: weight of an auxiliary head's loss on layer3, added to the labelled loss with the same
    #: criterion (U2PL's Cityscapes and AEL's configs: 0.4); 0 = no auxiliary head
    aux_weight: float = nonneg(0.0)
    #: ``align_corners`` of the segmenter's bilinear resizes (DeepLabV3+: ASPP pooling, decoder, logits): UniMatch
    #: and the seed paper's code use True, which changes the loss and gradients; null = the segmenter's release
    #: (DeepLabV3+: True, SegFormer: False)
    align_corners: Optional[bool] = None


@dataclass
class OptimConfig:
    #: sgd (momentum; the DeepLabV3+ frameworks as published) or adamw (Transformer segmenters)
    name: str = registry("sgd", "hafis.engine.optim:OPTIMIZERS")
    lr: float = positive(0.001)
    #: the published recipes train the randomly initialised head 10x faster than the pretrained backbone
    head_lr_multiplier: float = positive(10.0)
    #: SGD only
    momentum: float = unit(0.9)
    #: AdamW only
    betas: tuple[float, float] = bounded((0.9, 0.999), 0, 1, hi_open=True)
    weight_decay: float = nonneg(1e-4)
    #: the poly schedule lr·(1 - t/T)^power; step t uses it at t, or at t-1 for a framework whose release sets the
    #: rate after the step (UniMatch; ``Traits.lr_lag``)
    poly_power: float = nonneg(0.9)


@dataclass
class TrainConfig:
    #: the SSL recipe, a name of ``hafis.frameworks.FRAMEWORKS`` (supervised: the labelled images only)
    framework: str = registry("unimatch", "hafis.frameworks:FRAMEWORKS")
    #: changing it on resume changes the poly learning rate of every remaining step: resume refuses it unless
    #: ``--allow-change train.iterations``
    iterations: int = positive(1000, MAX_ITERATIONS)
    batch_size: int = positive(8, MAX_BATCH)
    unlabelled_batch_size: int = positive(8, MAX_BATCH)
    #: evaluation reads the model and draws from no training RNG, so it may change on resume
    eval_interval: int = positive(100, MAX_ITERATIONS, runtime=True)
    log_interval: int = positive(10, MAX_ITERATIONS, runtime=True)
    #: checkpoints are written every ``checkpoint_interval`` iterations (0 = at every evaluation) and at the end;
    #: the newest ``keep_checkpoints`` are kept
    checkpoint_interval: int = nonneg(0, MAX_ITERATIONS, runtime=True)
    keep_checkpoints: int = positive(2, 10000, runtime=True)
    progress_bar: bool = runtime(True)
    tensorboard: bool = runtime(True)
    #: may change on resume (the same experiment continued on other hardware)
    device: str = choice("auto", "auto", "cpu", "cuda", runtime=True)
    #: mixed precision of the training step: bf16 needs no loss scaling; fp16 uses a GradScaler. On CPU the
    #: convolutions run bf16 / fp16 oneDNN kernels (depthwise ones stay float32 with train.fast_convs); bf16 pays
    #: only on CPUs with native bf16 (AVX512-BF16 or AMX; elsewhere oneDNN emulates it, slower than float32).
    #: auto = bf16 where the device computes bf16 natively (a CUDA GPU of compute capability >= 8.0, a CPU with
    #: AVX512-BF16 or AMX), else off (hafis.precision); resume compares the precision it resolves to
    amp: str = choice("off", "off", "bf16", "fp16", "auto")
    #: exact CPU fast paths for the convolutions PyTorch runs slowly (all-padding taps of dilated kernels cut off,
    #: depthwise backward as convolutions): the same outputs and gradients up to float rounding; no effect on GPU
    fast_convs: bool = runtime(True)
    #: channels-last memory format for the model and its inputs (faster convolutions on recent GPUs)
    channels_last: bool = runtime(False)
    #: torch.compile the segmenter (first steps are slow while it compiles; one graph per input size)
    compile: bool = runtime(False)
    #: a non-finite loss skips its step; more than this many skipped steps in a run stop training (0 = stop at once)
    max_nonfinite_skips: int = nonneg(0, MAX_ITERATIONS, runtime=True)
    #: under torchrun, synchronise every BatchNorm of the trained networks over the processes, so batch statistics
    #: cover the global batch (as the released codes run; the paper configs set it): torch's SyncBatchNorm on GPUs,
    #: hafis's all-reduce one on CPU (gloo). No effect on one process
    sync_bn: bool = False


@dataclass
class UniMatchConfig:
    #: τ: pseudo-labels with weak-view confidence below it do not count (published: 0.95 VOC, 0 Cityscapes)
    threshold: float = unit(0.95)
    cutmix_prob: float = unit(0.5)
    #: where CutMix takes its pixels: same_images = a second batch of the main stream's images, augmented
    #: independently and pseudo-labelled by an extra no_grad pass in eval mode (as released); other_images = the same
    #: with a second batch of other images (a stream of its own order); in_batch = image i+1 of the same batch with
    #: its train-mode pseudo-labels (cheaper: no second batch, no extra pass; with one unlabelled image per process it
    #: mixes each image with itself)
    mix: str = registry("same_images", "hafis.frameworks.unimatch:MIXES")
    #: the published loss is (loss_x + 0.25 loss_s1 + 0.25 loss_s2 + 0.5 loss_fp) / 2
    strong_weight: float = nonneg(0.25)
    fp_weight: float = nonneg(0.5)


@dataclass
class UniMatchV2Config:
    """UniMatch V2 (frameworks/unimatch_v2.py); defaults are the released ones. CutMix: ``unimatch.cutmix_prob``."""

    #: τ: teacher pseudo-labels with confidence below it do not count (released: 0.95 on every dataset)
    threshold: float = unit(0.95)
    #: the EMA teacher's decay, reached after the warm-up min(1 - 1/(t + 1), ema_decay) (released: 0.996)
    ema_decay: float = unit(0.996)
    #: complementary channel dropout on the two strong views (needs model.name=dpt); false = plain strong views
    complementary_dropout: bool = True


@dataclass
class U2PLConfig:
    """U2PL (frameworks/u2pl.py); defaults are the released Pascal VOC ones."""

    #: labelled-only iterations before the teacher starts; null = one epoch (one pass over the unlabelled images,
    #: the released code's epoch, which repeats the labelled list to the unlabelled list's length)
    sup_only_iterations: Optional[int] = nonneg(None, MAX_ITERATIONS)
    ema_decay: float = unit(0.99)
    unsup_weight: float = nonneg(1.0)
    #: α_0 in percent: at iteration t the α_t = α_0 (1 - t/T) % highest-entropy pixels are unreliable (dropped from
    #: the CE, contrastive negatives) and the α_t % lowest-entropy ones are the unlabelled anchor candidates
    alpha: float = bounded(20.0, 0, 100)
    #: probability (per batch) of U2PL's half-area CutMix
    cutmix_prob: float = unit(0.5)
    contrastive_weight: float = nonneg(0.1)
    temperature: float = positive(0.5)
    #: anchors per class and negatives per anchor: the released configs' 256 / 50 (``num_queries`` /
    #: ``num_negatives``, which the maintainer says to follow: U2PL issue #38); the paper writes 50 / 256
    #: (``u2pl.num_anchors=50 u2pl.num_negatives=256``)
    num_anchors: int = positive(256, 65536)
    num_negatives: int = positive(50, 65536)
    #: negatives of class c: labelled pixels ranking c in [0, low_rank), unreliable ones ranking it in
    #: [low_rank, high_rank) (ranks from 0 = the argmax)
    low_rank: int = nonneg(3, 255)
    high_rank: int = nonneg(20, 255, at_least="u2pl.low_rank")
    #: δ_p: anchors need a teacher probability of their class above this
    anchor_threshold: float = unit(0.3)
    #: per-class FIFO memory of negative keys (released: 30000)
    queue_size: int = positive(30000, 10**6)
    #: channels of the representation head (released: 256)
    rep_dim: int = positive(256, MAX_CHANNELS)


@dataclass
class AELConfig:
    """AEL (frameworks/ael.py); defaults are the released Pascal VOC ones."""

    ema_decay: float = unit(0.99)
    #: teacher confidence below this: no pseudo-label (released VOC: 0.7)
    threshold: float = unit(0.7)
    unsup_weight: float = nonneg(1.0)
    #: dynamic re-weighting: each pseudo-labelled pixel counts with (teacher confidence)^gamma
    gamma: float = nonneg(2.0)
    #: adaptive equalization sampling: class c is sampled at ((1 - conf_c) / max(1 - conf))^sample_gamma
    sample_gamma: float = nonneg(1.0)
    #: EMA momentum of the confidence bank (released: 0.999, i.e. a time constant of ~1000 iterations)
    momentum: float = unit(0.999)
    #: starting confidence of every class; null = uniform random per class (the released torch.rand)
    confidence_init: Optional[float] = unit(None)
    copy_paste: bool = True
    #: probability that a labelled image gets pasted pixels
    copy_paste_prob: float = unit(0.5)
    #: classes drawn (with replacement) per iteration as the pasted content (released VOC: 1)
    copy_paste_classes: int = positive(1, 255)
    #: class indices never pasted ("stuff"; VOC and the synthetic scenes: background; Cityscapes: 0 1 2 8 10)
    paste_exclude: list[int] = nonneg(lambda: [0], 254)
    cutmix: bool = True
    #: false: CutMix with random half-area boxes instead of class-guided ones (an ablation)
    adaptive_cutmix: bool = True
    #: a class must cover this share of a candidate image (and of a connected component) to guide its box
    area_thresh: float = unit(0.03)


@dataclass
class AugSegConfig:
    """AugSeg (frameworks/augseg.py); defaults are the released Pascal VOC ones."""

    ema_decay: float = unit(0.999)
    #: τ of the thresholded CE against the teacher (released VOC: 0.95)
    threshold: float = unit(0.95)
    unsup_weight: float = nonneg(1.0)
    #: at most this many of the 11 intensity ops per image (released: 3), their count uniform in 1..num_augs
    num_augs: int = bounded(3, 1, 11)
    #: false: exactly num_augs ops per image
    random_num_augs: bool = True
    cutmix: bool = True
    #: probability (per batch) of the adaptive label-aided CutMix (released: 1.0)
    cutmix_prob: float = unit(1.0)
    #: the student also sees the weak unlabelled view (its predictions unused; BatchNorm statistics only): off in the
    #: configs of the released training logs behind the paper's numbers, on in the repository's exps/ VOC configs
    extra_weak: bool = False
    #: the teacher copies the student during these first iterations; null = one epoch (released)
    teacher_copy_iterations: Optional[int] = nonneg(None, MAX_ITERATIONS)


@dataclass
class WeightingConfig:
    enabled: bool = False
    #: top-k channels compared; at most the decoder's feature channels
    k: int = positive(5, at_most="model.feature_dim")
    #: 0 = the paper's W = s/k; 1 = the authors' released code, W = 1 + s/k (negative would give negative weights)
    offset: float = nonneg(0.0)
    #: count = the framework's own normaliser (paper); weight = divide by the sum of W (authors' code)
    normalize: str = registry("count", "hafis.weighting.loss:NORMALIZE_MODES")
    memory_per_class: int = positive(256, 2**20)
    #: pixels of each class pushed into the bank per batch (a few per image)
    samples_per_class: int = positive(32, 2**20)
    #: labelled pixels feed the bank when predicted right with confidence above this (the paper: 0.95)
    labelled_threshold: float = unit(0.95)
    #: how unlabelled pixels are judged reliable for the bank: ``detector`` = the paper's rule (confidence ≥ tau_seg
    #: and a same-class detection ≥ tau_det covers the pixel; needs ``hafis detect CONFIG`` first, see
    #: ``detector``); ``confidence`` = confidence ≥ tau_seg alone (the ablation; no detector needed)
    reliable: str = choice("detector", "detector", "confidence")
    tau_seg: float = unit(0.95)
    #: detections scoring at least this become boxes of the per-class box mask (the authors' code: 0.95)
    tau_det: float = unit(0.95)
    #: pseudo-labels of classes the detector has no class for (background, stuff), with ``reliable: detector``:
    #: ``exclude`` = never reliable (the authors' code), ``confidence`` = judged by tau_seg alone
    stuff: str = registry("exclude", "hafis.weighting.reliable:STUFF_MODES")
    #: features are resized to the labels' size: bilinear (authors) or nearest (cheaper)
    align: str = registry("bilinear", "hafis.weighting.alignment:ALIGN_MODES")
    #: align_corners of that bilinear resize; null = the segmenter's own (model.align_corners: True for DeepLabV3+,
    #: as the authors), so W ranks the features the way the network resizes its logits
    align_corners: Optional[bool] = None
    #: which unlabelled view's features feed the bank: weak (hafis: the view the pseudo-labels come from) or strong
    #: (the authors' code: the CutMixed strong views, with the CutMixed pseudo-labels, confidences and box masks)
    bank_view: str = choice("weak", "weak", "strong")
    #: a class gets a prototype only when its labelled queue is non-empty (the authors' code); false = when either
    #: queue is (hafis: a class found only by reliable unlabelled pixels is weighted too)
    require_labelled: bool = False
    #: what W is computed from: ``similarity`` = offset + s/k (the method); ``confidence`` = offset + the pixel's
    #: confidence, the softmax maximum of the pseudo-labelling prediction (a control: no prototype; docs/method.md, 5)
    signal: str = registry("similarity", "hafis.weighting.controls:SIGNALS")
    #: a control (docs/method.md, 5): W permuted at random among the pixels of each pseudo-label class that a loss term
    #: counts, so each class keeps its weights but which pixel gets which is lost
    shuffle: bool = False


@dataclass
class DetectorConfig:
    """The detector of ``weighting.reliable: detector`` (docs/method.md, 1), trained by ``hafis detect CONFIG`` on
    the labelled images only; its detections over the unlabelled images are cached on disk."""

    #: resnet50_fpn = the paper's Faster R-CNN ResNet-50-FPN (GPU); mobilenet_v3_large_fpn = lighter; tiny = a CPU
    #: detector with 8-64 px anchors for 32-128 px images (tests, demo); efficientnet_lite0 = a CPU detector on the
    #: ImageNet EfficientNet-Lite0 trunk (stride 8, 16-128 px anchors; the realistic benchmark)
    arch: str = registry("resnet50_fpn", "hafis.detection.networks:ARCHITECTURES")
    #: training steps (Adam); the authors train "many epochs"
    iterations: int = positive(10000, MAX_ITERATIONS)
    batch_size: int = positive(4, MAX_BATCH)
    #: the authors' Adam learning rate; a tiny detector trained briefly needs a larger one
    lr: float = positive(5e-5)
    weight_decay: float = nonneg(0.0)
    #: training boxes: instances = the reader's instance boxes, components = connected components of each thing
    #: class in the mask, auto = instance boxes where the image has any, else components, combined = instance
    #: boxes plus connected components of ``component_classes`` (the authors' Cityscapes recipe)
    boxes: str = registry("auto", "hafis.detection.train:BOX_MODES")
    #: connected components smaller than this many pixels give no box (the authors: 90 px for thin classes)
    component_min_area: int = nonneg(0, MAX_SIDE * MAX_SIDE)
    #: with ``boxes: combined``: classes (names) without instances whose connected components become boxes; the
    #: detector then detects them too (the authors, Cityscapes: pole, traffic light, traffic sign)
    component_classes: list[str] = field(default_factory=lambda: ["pole", "traffic light", "traffic sign"])
    #: torchvision's input resize (shorter side, longer-side cap); null = the first labelled image's own size
    min_size: Optional[int] = positive(None, MAX_SIDE)
    max_size: Optional[int] = positive(None, MAX_SIDE, at_least="detector.min_size")
    #: lowest score stored in the cache (so weighting.tau_det can change without running the detector again)
    score_threshold: float = unit(0.05)
    detections_per_image: int = positive(100, 10000)
    #: a trained detector to use as it is (hafis detect then only runs it); null = train one into output_dir
    checkpoint: Optional[str] = None
    #: where the trained detector (detector.pt) and the detection cache go; ``{name}`` is the experiment name
    output_dir: str = runtime("runs/{name}/detector")
    #: local torchvision ResNet-50 weights for resnet50_fpn's backbone (nothing is ever downloaded)
    backbone_weights: Optional[str] = None
    inference_batch_size: int = positive(8, MAX_BATCH, runtime=True)
    #: images per resumable piece of the detection cache
    chunk_size: int = positive(256, 10**6, runtime=True)


@dataclass
class LossConfig:
    """The supervised loss on labelled pixels (hafis.frameworks.losses; used by every framework)."""

    #: ce = cross-entropy; ohem = online hard example mining CE (the published Cityscapes recipes)
    labelled: str = registry("ce", "hafis.frameworks.losses:LABELLED_LOSSES")
    #: OHEM keeps pixels whose true-class probability is at most this ...
    ohem_threshold: float = unit(0.7)
    #: ... and at least this many of the hardest pixels per image (UniMatch: 200,000 per 2-image GPU batch)
    ohem_min_kept: int = nonneg(100000, 10**9)


@dataclass
class EvalConfig:
    #: images per forward pass; validation images of different sizes are run one at a time
    batch_size: int = positive(8, MAX_BATCH, runtime=True)
    #: whole = the whole image in one pass (VOC as published); sliding = overlapping windows whose softmax
    #: outputs are averaged (Cityscapes, COCO as published)
    mode: str = choice("whole", "whole", "sliding")
    #: sliding window side in pixels; null = data.crop_size (the published choice)
    window: Optional[int] = positive(None, MAX_SIDE)
    #: step between windows; null = 2/3 of the window (an overlap of 1/3, as published)
    stride: Optional[int] = positive(None, MAX_SIDE, at_most="eval.window")
    #: at every evaluation, measure the pseudo-labels of the first N unlabelled images against their ground truth
    #: (which never reaches training): wrong share unweighted / W-weighted, AUROC of W and of the confidence, bank
    #: precision; logged as ``diagnostics`` in metrics.jsonl. 0 = off (it costs a forward pass over N images)
    diagnostics_images: int = nonneg(0, 100000)



@dataclass
class Config:
    #: name and output_dir may change on resume (``--resume PATH`` continues a run into another folder)
    name: str = runtime("experiment")
    seed: int = seed_value(0)
    #: where checkpoints, metrics.jsonl and TensorBoard logs go; ``{name}`` is replaced by the name
    output_dir: str = runtime("runs/{name}")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unimatch: UniMatchConfig = field(default_factory=UniMatchConfig)
    unimatch_v2: UniMatchV2Config = field(default_factory=UniMatchV2Config)
    u2pl: U2PLConfig = field(default_factory=U2PLConfig)
    ael: AELConfig = field(default_factory=AELConfig)
    augseg: AugSegConfig = field(default_factory=AugSegConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
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
        value = parse_yaml(text, f"override {short(item)}") if text.strip() else None
        _set_dotted(raw, key.strip(), value)
    config = from_dict(Config, raw, source)
    problems = relation_errors(config, lambda key: get_key(config, key)) + _input_multiple_errors(config)
    if problems:
        raise ConfigError(f"{source}: {problems[0]}")
    for key in ("output_dir", "detector.output_dir"):
        _check_placeholders(get_key(config, key), key, source)
    return config


def _input_multiple_errors(config: Config) -> list[str]:
    """Crop and sliding window must be multiples of the segmenter's ``input_multiple`` (dpt: its 14 px patch)."""
    from hafis.models import SEGMENTERS

    multiple = getattr(SEGMENTERS.get(config.model.name), "input_multiple", 1)
    return [f"'{key}' must be a multiple of {multiple} for model.name={config.model.name}, got {value}"
            for key, value in (("data.crop_size", config.data.crop_size), ("eval.window", config.eval.window))
            if value is not None and value % multiple]


def _check_placeholders(template: str, key: str, source: str) -> None:
    """``{name}`` is the one placeholder of an output folder; another (``{nme}``) or a stray brace is an error now,
    not when the folder is first made."""
    try:
        template.format(name="x")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        what = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, (KeyError, IndexError)) else str(exc)
        raise ConfigError(f"{source}: '{key}' = {short(template)}: {what}; the only placeholder is {{name}} "
                          f"(write a literal brace as {{{{ or }}}})") from None


def get_key(config: Any, key: str) -> Any:
    """The value of a dotted key such as ``model.feature_dim``."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KB; is it a config?")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {blob[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {path}: 'base' must be the path of another config file, got {short(base)}")
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
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {short(raw)}")
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
        choices = f.metadata.get("choices")
        value = _coerce(_null_word(_switch_word(raw[name], choices), typ, choices), typ, key, source)
        if isinstance(choices, RegistryNames) and choices.by:  # allowed names depend on a sibling key's value
            by = values.get(choices.by, fields[choices.by].default)
            if value not in choices.names_for(by):
                raise ConfigError(f"{source}: '{key}' must be one of {list(choices.names_for(by))} with "
                                  f"'{prefix}{choices.by}' {by!r}, got {short(value)}")
        elif choices and value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {show_choices(choices)}, got {short(value)}")
        problem = range_error(f, value)
        if problem:
            raise ConfigError(f"{source}: '{key}' {problem}")
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}': {exc}") from None


def _switch_word(value: Any, choices: Any) -> Any:
    """YAML 1.1 reads the words off / no (on / yes) as False (True): a mode switch (choices that are words) gets the
    word back, so ``train.amp: off`` and ``train.amp=off`` mean the mode "off"."""
    if isinstance(value, bool) and isinstance(choices, tuple) and all(isinstance(c, str) for c in choices):
        return "on" if value else "off"
    return value


def _null_word(value: Any, typ: Any, choices: Any) -> Any:
    """``none`` / ``null`` / ``~`` (any case) as a string is ``None`` for a key that may be null and is not a free
    string (a path may be called ``none``): ``model.pretrained=none``, ``eval.window: None``."""
    if not isinstance(value, str) or value.strip().lower() not in NULL_WORDS:
        return value
    args = typing.get_args(typ)
    if typing.get_origin(typ) not in (Union, types.UnionType) or type(None) not in args:
        return value
    inner = [a for a in args if a is not type(None)][0]
    return value if inner is str and not choices else None


def _coerce(value: Any, typ: Any, key: str, source: str, nullable: bool = False) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source, nullable=type(None) in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {short(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {short(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if typ is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; it is the usual way to write a learning rate
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(typ)
    if ok is None:
        return value
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {typ.__name__}{' or null' if nullable else ''}, got "
                          f"{short(value)} ({type(value).__name__})")
    if typ is float:
        try:
            return float(value)
        except OverflowError:  # an int of hundreds of digits
            raise ConfigError(f"{source}: '{key}' = {short(value)} is too large for a float") from None
    return value


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_changes(old: Optional[dict], new: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between a checkpoint's config (``to_dict`` form) and ``new`` and that alter the
    experiment, as ``key -> (old, new)``. Keys declared ``runtime`` (logging, checkpoint rotation, device, ...) may
    differ; every other key, including one only one side knows (another hafis version's), alters the experiment.
    ``None`` (a checkpoint without a config) compares as an empty one."""
    free = set(_runtime_keys(Config))
    before, after = _flatten(old or {}), _flatten(to_dict(new))
    absent = "<absent>"
    changes = {}
    for key in list(after) + [k for k in before if k not in after]:
        a, b = before.get(key, absent), after.get(key, absent)
        if a != b and key not in free:
            changes[key] = (a, b)
    if "train.amp" in changes:  # the precision trained in counts, not the word (bf16 -> auto: none where auto is bf16)
        changes.update(_amp_change(*changes.pop("train.amp"), new.train.device))
    return changes


def _amp_change(old: Any, new: Any, device: str) -> dict[str, tuple[Any, Any]]:
    """``train.amp`` old -> new compared by the precision each means on ``device`` (``auto`` resolved there, as
    :mod:`hafis.precision` does); ``{}`` when they mean the same."""
    from hafis.precision import resolve_amp

    def resolved(value):
        return resolve_amp(value, device)[0] if value in ("auto", "off", "bf16", "fp16") else value

    a, b = resolved(old), resolved(new)
    if a == b:
        return {}
    return {"train.amp": (old if a == old else f"{old} ({a})", new if b == new else f"{new} ({b})")}


def _runtime_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _runtime_keys(hints[f.name], prefix + f.name + ".")
        elif is_runtime(f):
            keys.append(prefix + f.name)
    return keys


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
