"""What every SSL framework shares: the step interface of the trainer and the one door to the weighting plug-in.

A framework is a loss recipe. The shared trainer gives it a labelled batch and an unlabelled batch per iteration
and gets back a loss to minimise; the framework never owns the optimiser, the data or the logs.
The weighting is reached only through :class:`PseudoLabelWeighting`, which reads the framework's features,
pseudo-labels and confidences and returns ``W`` (``None`` when the method is off, so the framework runs exactly as
published).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hafis.config import Config, ConfigError, WeightingConfig
from hafis.data.ssl import LabelledBatch, UnlabelledBatch
from hafis.data.transforms import PIL_GEOMETRY, Geometry
from hafis.weighting import (
    PseudoLabelWeighter,
    confidence_weights,
    confident_pixels,
    detector_reliable,
    labelled_qualify_mask,
    shuffle_within_classes,
    weighted_cross_entropy,
)


@dataclass
class StepOutput:
    loss: Tensor
    #: named loss terms and diagnostics (0-d tensors), logged by the trainer; non-finite terms are reported by name
    terms: dict[str, Tensor] = field(default_factory=dict)


class PseudoLabelWeighting:
    """The framework-side adapter of :class:`~hafis.weighting.PseudoLabelWeighter` (the plug-in's one door).

    ``update`` feeds the bank (labelled pixels predicted right with confidence > ``labelled_threshold``; unlabelled
    pixels judged reliable by ``reliable``); ``weights`` returns ``W`` for pseudo-labels; ``loss`` is the weighted CE
    with the configured normalisation. With ``enabled: false`` nothing is stored and ``weights`` is ``None``.

    ``reliable: detector`` (the paper) needs the unlabelled batch's per-class box mask ``box_mask_u``
    ``(B, C, H, W)``, geometrically aligned with (and CutMixed like) ``pseudo_u``, and ``thing_classes`` (the classes
    the detector has a class for; the framework passes its context's).

    The controls (docs/method.md, 5): ``signal: confidence`` makes ``weights`` return ``offset + q`` from the
    confidences the framework passes (the bank is still fed, and unused by ``W``); ``shuffle: true`` makes ``loss``
    permute ``W`` among the pixels of each pseudo-label class that the term counts (mask > 0, target not ignored),
    each term with its own permutation, drawn from a generator seeded by (seed, rank, the terms shuffled so far):
    that count is checkpointed, so a resumed run and every rank replay their draws.
    """

    def __init__(self, config: WeightingConfig, num_classes: int, feature_dim: int, seed: int,
                 thing_classes: Sequence[int] = (), align_corners: bool = True) -> None:
        self.config = config
        self.enabled = config.enabled
        self.thing_classes = tuple(thing_classes)
        self.seed = int(seed)
        #: loss terms whose W was shuffled so far (``shuffle: true``): the next permutation's generator seed
        self.shuffle_draws = 0
        self.weighter: Optional[PseudoLabelWeighter] = None
        if self.enabled:
            self.weighter = PseudoLabelWeighter(
                num_classes, feature_dim, k=config.k, offset=config.offset, memory_per_class=config.memory_per_class,
                samples_per_class=config.samples_per_class, align=config.align, seed=seed,
                align_corners=align_corners if config.align_corners is None else config.align_corners,
                require_labelled=config.require_labelled,
            )

    def to(self, device: torch.device) -> "PseudoLabelWeighting":
        if self.weighter is not None:
            self.weighter.to(device)
            # the label-range checks cost one host-device sync per call on a GPU (free on CPU, where they stay on);
            # the frameworks' pseudo-labels are argmaxes (always in range), and out-of-range labels can neither enter
            # the bank nor index out of bounds in the weights, so a GPU step runs without them
            validate = torch.device(device).type == "cpu"
            self.weighter.validate = self.weighter.bank.validate = validate
        return self

    @torch.no_grad()
    def update(self, features_l: Tensor, logits_l: Tensor, labels: Tensor,
               features_u: Tensor, confidence_u: Tensor, pseudo_u: Tensor, ignore_u: Tensor,
               box_mask_u: Optional[Tensor] = None) -> None:
        if self.weighter is None:
            return
        self.weighter.update_labelled(features_l, labels,
                                      labelled_qualify_mask(logits_l, labels, self.config.labelled_threshold))
        self.weighter.update_unlabelled(features_u, pseudo_u,
                                        self.reliable(confidence_u, pseudo_u, ignore_u, box_mask_u))

    def reliable(self, confidence_u: Tensor, pseudo_u: Tensor, ignore_u: Tensor,
                 box_mask_u: Optional[Tensor] = None) -> Tensor:
        """Unlabelled pixels that may feed the bank (``weighting.reliable``). With the method off and no box mask
        (reports of a plain run) the confidence rule answers; with it on, a missing box mask is an error."""
        valid = ignore_u != 255
        c = self.config
        if c.reliable == "confidence" or (box_mask_u is None and not self.enabled):
            return confident_pixels(confidence_u, pseudo_u, c.tau_seg) & valid
        if box_mask_u is None:
            raise ValueError("weighting.reliable is 'detector' but the unlabelled batch has no 'box_mask': the "
                             "trainer adds it from the detections of `hafis detect`; a framework must pass it "
                             "(CutMixed like its pseudo-labels) to PseudoLabelWeighting.update / reliable")
        return detector_reliable(confidence_u, pseudo_u, valid, box_mask_u, self.thing_classes, c.tau_seg, c.stuff)

    def weights(self, features_u: Tensor, pseudo_u: Tensor, confidence_u: Optional[Tensor] = None) -> Optional[Tensor]:
        """``W`` of the pseudo-labels ``pseudo_u`` (``None`` with the method off); ``confidence_u``, the softmax
        maximum of the prediction that gave them, is what ``signal: confidence`` weights by."""
        if self.weighter is None:
            return None
        if self.config.signal == "confidence":
            if confidence_u is None:
                raise ValueError("weighting.signal is 'confidence' but the framework passed no confidence to "
                                 "PseudoLabelWeighting.weights")
            return confidence_weights(confidence_u, self.config.offset)
        return self.weighter.weights(features_u, pseudo_u)

    def loss(self, logits: Tensor, target: Tensor, weight: Optional[Tensor], mask: Tensor,
             denominator_mask: Optional[Tensor] = None) -> Tensor:
        """The framework's per-pixel CE times ``W``; ``normalize: weight`` swaps the framework's ``Z`` for ``Σ W``;
        ``shuffle: true`` permutes ``W`` first among the counted pixels (``mask > 0``, target not ignored) of each
        target class."""
        normalize = self.config.normalize if weight is not None else "count"
        if weight is not None and self.config.shuffle:
            eligible = mask.bool() & (target != 255)
            weight = shuffle_within_classes(weight, target, eligible, self._shuffle_generator(weight.device))
        return weighted_cross_entropy(logits, target, weight, mask, normalize, denominator_mask)

    def _shuffle_generator(self, device: torch.device) -> torch.Generator:
        """A generator for the next shuffle, seeded by (seed, rank, shuffles so far) and counted."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = hashlib.blake2b(f"{self.seed}/{rank}/{self.shuffle_draws}".encode(), digest_size=8).digest()
        self.shuffle_draws += 1
        return torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)

    def state_dict(self) -> dict:
        if self.weighter is None:
            return {}
        state = self.weighter.state_dict()
        if self.config.shuffle:
            state["shuffle_draws"] = torch.tensor(self.shuffle_draws)
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.weighter is not None:
            if "shuffle_draws" in state:
                metadata = getattr(state, "_metadata", None)
                state = OrderedDict(state)
                self.shuffle_draws = int(state.pop("shuffle_draws"))
                if metadata is not None:
                    state._metadata = metadata
            self.weighter.load_state_dict(state)


@dataclass(frozen=True)
class Traits:
    """What a framework declares to the trainer, once: which streams it reads, how they are drawn, how its networks
    are trained. Every field has the plain default; a framework lists only where it differs."""

    #: the framework reads the unlabelled stream (False: the labelled images only, the supervised baseline)
    uses_unlabelled: bool = True
    #: the framework mixes in a second unlabelled batch (UniMatch): the trainer then adds one as
    #: ``unlabelled["mix"]``, from a stream whose augmentations are drawn independently and whose images are the
    #: main stream's (``"same_images"``, as UniMatch's release) or in an order of their own (``"other_images"``)
    mix_batch: Optional[str] = None
    #: step ``t`` uses the poly rate of iteration ``t - lr_lag`` (0 at the first steps): 0 sets the rate before the
    #: step (U2PL's release); UniMatch's release sets it after the step, so its step ``t`` uses ``lr(t - 1)``
    lr_lag: int = 0
    #: probability of the CutMix boxes ``box1`` / ``box2`` the unlabelled stream draws with every image (UniMatch
    #: reads them: its ``unimatch.cutmix_prob``); 0 = none, for a recipe that mixes in its own way
    cutmix_prob: float = 0.0
    #: the framework can feed the bank from its strong views (``weighting.bank_view: strong``, the authors' code,
    #: which is UniMatch's)
    strong_bank_view: bool = False
    #: attributes holding the networks the optimiser trains; under torchrun the trainer wraps them in one
    #: DistributedDataParallel and every call of ``self.<name>(...)`` goes through it
    networks: tuple[str, ...] = ("model",)
    #: every step calls the same networks and gives every trained parameter a gradient (DDP's ``static_graph``);
    #: a recipe whose steps may leave a trained parameter without gradient sets False
    static_graph: bool = True
    #: how the release draws and applies the weak geometry of both streams (scale draw, padding side and colour,
    #: flip order, antialiasing); label-like maps are resized pixel-centre whatever it is
    geometry: Geometry = PIL_GEOMETRY
    #: the framework reads the unlabelled stream's strong views and CutMix boxes (False: the stream leaves them out,
    #: for a recipe that augments the weak view itself or not at all: U2PL, AEL, AugSeg)
    strong_views: bool = True


@dataclass(frozen=True)
class FrameworkContext:
    """What a framework is built with besides its config and model: facts of the run's data."""

    #: classes of the dataset (the segmenter's outputs)
    num_classes: int
    #: iterations in one pass over the unlabelled images (the released codes' "epoch"), which the mean-teacher
    #: recipes' epoch-based schedules read (U2PL's supervised-only epoch, AugSeg's warm-up); None when unknown (a
    #: framework built outside a run: such a schedule must then be given in iterations)
    epoch_length: Optional[int] = None
    #: the classes the detector detects (``weighting.reliable: detector``; the dataset's thing classes)
    thing_classes: tuple[int, ...] = ()


class Framework:
    """Base class of the loss recipes. Subclasses set ``name`` and ``traits`` and implement :meth:`train_step`;
    docs/frameworks.md is the contract with the trainer."""

    name = "base"
    traits = Traits()

    def __init__(self, config: Config, model: nn.Module, ctx: FrameworkContext) -> None:
        self.config = config
        self.model = model
        self.ctx = ctx
        self.num_classes = ctx.num_classes
        if config.weighting.enabled and config.weighting.bank_view == "strong" and not self.traits.strong_bank_view:
            raise ConfigError(f"weighting.bank_view=strong is implemented for unimatch (the authors' code), not for "
                              f"{self.name}; use weighting.bank_view=weak")
        self.weighting = PseudoLabelWeighting(config.weighting, ctx.num_classes, config.model.feature_dim,
                                              config.seed, thing_classes=ctx.thing_classes,
                                              align_corners=getattr(model, "align_corners", True))

    def to(self, device: torch.device) -> "Framework":
        self.weighting.to(device)
        return self

    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch],
                   iteration: int) -> StepOutput:
        """The loss of iteration ``iteration`` (``unlabelled``: None when the framework reads no unlabelled images)."""
        raise NotImplementedError

    def param_groups(self, lr: float, head_lr_multiplier: float, weight_decay: float) -> list[dict]:
        """SGD groups for parameters the framework owns besides the model's (U2PL's representation head); the
        trainer appends them to the model's groups. None by default."""
        return []

    def after_optimizer_step(self, iteration: int) -> None:
        """Hook for teachers (EMA) and banks updated after the weights change."""

    def teachers(self) -> list[nn.Module]:
        """Networks that follow the trained ones without gradient (EMA teachers): never wrapped in DDP; the
        trainer keeps their buffers equal on every rank at checkpoints."""
        return []

    def eval_model(self) -> nn.Module:
        """The network that is evaluated and checkpointed as 'the model' (the student, or a teacher)."""
        return self.model

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks evaluated at every evaluation, by name, when there are several (UniMatch V2: its teacher, which
        is :meth:`eval_model`, and its student); the log names the best."""
        return {}

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, box_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Pseudo-labels, confidence, reliable mask and weights of unlabelled images, for reports and pictures
        (``box_mask``: the images' ``(B, C, H, W)`` detection box masks, needed with ``reliable: detector``)."""
        model = self.eval_model()
        was_training = model.training
        model.eval()
        out = model(images)
        model.train(was_training)
        conf, pseudo = out.logits.softmax(dim=1).max(dim=1)
        ignore = torch.zeros_like(pseudo)
        result = {"pseudo": pseudo, "confidence": conf,
                  "reliable": self.weighting.reliable(conf, pseudo, ignore, box_mask)}
        w = self.weighting.weights(out.features, pseudo, conf)
        if w is not None:
            result["weight"] = w
        return result

    def replicated_modules(self) -> list[nn.Module]:
        """Modules besides the networks and teachers that every rank computes identically from all-reduced inputs
        (the weighting's bank); the trainer checks that the ranks agree on them at evaluations and checkpoints."""
        weighter = self.weighting.weighter
        return [] if weighter is None else [weighter]

    def state_dict(self) -> dict:
        """The checkpointed state every rank holds alike (a checkpoint's ``framework`` entry)."""
        return {"weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.weighting.load_state_dict(state.get("weighting", {}))

    def rank_state(self) -> Optional[dict]:
        """The checkpointed state each rank holds on its own (the bank's sampling generators: ranks draw from their
        own seeds), None when there is none; the trainer stores every rank's (a checkpoint's ``bank_generators``)."""
        weighter = self.weighting.weighter
        return None if weighter is None else weighter.bank.get_extra_state()

    def load_rank_state(self, state: dict) -> None:
        """This rank's :meth:`rank_state` from a checkpoint (``{}``: a rank the checkpointed run lacked)."""
        if self.weighting.weighter is not None:
            self.weighting.weighter.bank.set_extra_state(state)
