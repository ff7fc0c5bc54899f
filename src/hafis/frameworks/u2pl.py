"""U2PL (Wang et al., CVPR 2022): a mean teacher that uses its *unreliable* pixels as contrastive negatives.

Recipe, per iteration ``t`` of ``T`` (``train.iterations``):

1. **Supervised-only start.** For the first ``u2pl.sup_only_iterations`` iterations (``null`` = one epoch, the
   released default: one pass over the unlabelled images, ``⌊N_u / B_u⌋`` iterations, because the released loader
   repeats the labelled list to the unlabelled list's length) the loss is the labelled CE alone and the student is
   what is evaluated. At the first semi-supervised iteration the teacher becomes an exact copy of the student; from
   then on it is the EMA of the student with the warm-up decay ``min(1 − 1/(s + 1), u2pl.ema_decay)``, ``s`` the
   number of EMA updates so far, and the teacher is what is evaluated and checkpointed as "the model".
2. **Pseudo-labels** ``ŷ, q = argmax / max softmax(teacher(u))`` on the weakly augmented unlabelled view (U2PL has
   no colour augmentation). With probability ``u2pl.cutmix_prob`` (per batch) every image ``i`` then gets a box of
   half its area (width uniform in ``(W/2, W)``) from image ``i + 1`` (cyclically); pseudo-labels, ignore mask and
   ``W`` follow the box.
3. **Student** on ``cat(x, u_mix)``; **teacher** (eval mode) on the same batch for the entropy, the class ranks and
   the representations of the contrastive loss.
4. **Unsupervised CE** against ``ŷ`` on the pixels whose teacher entropy ``H`` is below the ``(100 − α_t)``-th
   percentile (linear interpolation, as ``numpy.percentile``) of the non-ignored pixels, with
   ``α_t = u2pl.alpha · (1 − t / T)`` (20 % → 0, linear; the released code steps it once per epoch).
   **Normaliser** (the released ``compute_unsupervised_loss``): the CE is averaged over the kept pixels ``K`` and
   multiplied by ``N / |K|``, ``N`` the non-ignored pixels, i.e. ``L_u = Σ_K ℓ · N / |K|²``. With the weighting on,
   ``Σ_K ℓ / |K|`` becomes ``Σ_K W ℓ / |K|`` (``normalize: count``) or ``Σ_K W ℓ / Σ_K W`` (``normalize: weight``);
   the ``N / |K|`` factor is kept.
5. **Contrastive loss** (weight ``u2pl.contrastive_weight`` = 0.1, temperature 0.5) on a representation head, at
   the decoder feature's resolution (masks and labels nearest-downsampled, teacher logits bilinearly). For each
   class ``c`` present among the candidate anchors:

   * candidate anchors: labelled pixels of class ``c`` and unlabelled pixels pseudo-labelled ``c`` among the
     ``α_t`` % lowest-entropy ones (the reliable ones); anchors are those with teacher ``p_c > δ_p`` (0.3);
     ``u2pl.num_anchors`` of them are drawn with replacement (student representations; 256, the released
     ``num_queries``: the paper's Sec. 4.1 says 50 anchors and 256 negatives, the released configs 256 and 50, and
     the maintainer says to follow the code, U2PL issue #38; ``u2pl.num_anchors=50 u2pl.num_negatives=256`` gives
     the paper's);
   * positive: the class prototype, the mean *teacher* representation of the candidate anchors;
   * negatives (the paper's Eq. 10-12, teacher representations): labelled pixels whose label is not ``c`` and whose
     teacher prediction ranks ``c`` among its top ``low_rank`` (3), and *unreliable* unlabelled pixels (the ``α_t``
     % highest-entropy ones) whose prediction ranks ``c`` in ``[low_rank, high_rank)`` = ``[3, 20)`` (ranks from
     0, as the released code slices them). They are pushed into a per-class FIFO queue (``u2pl.queue_size``) and
     ``num_anchors × num_negatives`` (256 × 50) keys are drawn from it with replacement;
   * ``ℓ_c = CE(cos(anchor, [positive, negatives]) / τ, 0)`` averaged over the anchors; the loss is
     ``Σ_c ℓ_c / (number of classes present)``, and 0 when fewer than two classes are present (so binary tasks give
     no contrastive loss from unlabelled ranks 3..19, as users of the released code found).

   The released code's one-hot helper fills only the first image of each batch, so only one labelled and one
   unlabelled image per GPU feed its contrastive loss, and its negative mask multiplies in the pixel's own one-hot
   label (which empties the labelled negatives); hafis implements the loss as the paper describes it, on all images.

6. ``loss = L_x + u2pl.unsup_weight · L_u + u2pl.contrastive_weight · L_contra``.

The **representation head**: with the released network (``model.decoder: released``, the paper configs) it is the
released one, part of the segmenter (three convolutions on the decoder's 512-channel concatenation, trained in its
head group); with hafis's DeepLabV3+ it lives in the framework: ``conv3x3(D → rep_dim) + BN + ReLU + Dropout2d(0.1)
+ conv1x1(rep_dim → rep_dim)`` on the decoder feature, which joins the optimiser through :meth:`param_groups` at the
head's learning rate, is EMA'd into the teacher with the segmenter and saved in the framework's checkpoint state
(with the teacher and the queues).

The supervised term is :func:`~hafis.frameworks.losses.labelled_loss`: ``loss.labelled`` (released VOC: CE;
Cityscapes: OHEM) plus ``model.aux_weight`` (0.4 on Cityscapes) times the same on the auxiliary head. With the
weighting off, one step's ``L_x`` and ``L_u`` and their gradients equal a transcription of the released step
(``tests/frameworks/test_u2pl_released.py``). Deviations from the released code: the contrastive term above; the
teacher runs in eval mode for the entropy / contrastive pass (released: train mode; see
:mod:`hafis.frameworks.teacher`); α steps every iteration (released: every epoch); one queue size for every class
(released: 50,000 for class 0). The negative queues are checkpointed for an exact resume: at the published size
(30,000 keys of 256 floats per class) that is ~30 MB per class.
With the weighting on, ``W`` is computed from the teacher's decoder features of the weak view (the view the
pseudo-labels come from) and the bank is fed from the teacher's labelled and weak-view outputs; the contrastive
term is unchanged.

**Data, as released** (:data:`~hafis.data.transforms.TENSOR_GEOMETRY`; ``tests/data/test_released_tensor_pipelines.py``
compares both streams' samples pixel by pixel with a transcription of ``u2pl/dataset/augmentation.py`` on 500x375
and 2048x1024 images): normalise, rescale by a factor drawn half the time in [0.5, 1) and half in [1, 2) (sides
truncated), flip, pad around the image to the crop (513 VOC, 769 Cityscapes), crop at random; no blur, no rotation
(the released configs). Departures, with their measured sizes:

* labels are resized pixel-centre (PIL ``NEAREST``); the release's torch ``nearest`` puts them about half a source
  pixel up and left of their pixels: 0.3-1.6 % of a crop's labelled pixels differ (a VOC-like mask; all on label
  boundaries);
* padding is ignored (255). The released ``Crop`` labels it 0 (background) in the labelled crops, and
  ``train_semi.py`` drops the unlabelled labels, so unlabelled padding is trained on with its pseudo-labels.
  Padding is on average 31.8 % of a VOC crop over the scale draw (68 % of the crops have some) and 4.2 % of a
  Cityscapes crop (25 %);
* images are resized as uint8 (rounded) and padded with the uint8 mean colour (124, 116, 104) rather than the exact
  mean (0 after the release's ``Normalize``): at most half a grey level, 0.0088 in normalised units (0.0082 on the
  padding);
* evaluation follows ``eval`` (VOC whole image; Cityscapes 769 windows at stride 512, softmax averaged). The
  released train-time validation scores a centre crop: 513 on VOC, its padding labelled background (28.8 % of the
  scored pixels of a 500x375 image); 769 on Cityscapes, the image's centre only. ``eval.py`` slides 769 windows at
  stride 513 over Cityscapes and averages their logits.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hafis.config import Config
from hafis.data.transforms import TENSOR_GEOMETRY

from .base import FrameworkContext, LabelledBatch, StepOutput, UnlabelledBatch
from .losses import labelled_loss
from .mixing import partner_index, paste
from .teacher import MeanTeacherFramework, softmax_entropy


class RepresentationHead(nn.Module):
    """U2PL's projection of the decoder feature into the contrastive space."""

    def __init__(self, in_dim: int, rep_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, rep_dim, 3, padding=1, bias=True),
            nn.BatchNorm2d(rep_dim),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(rep_dim, rep_dim, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class SegmenterWithRepresentation(nn.Module):
    """The student (or teacher) of U2PL: the segmenter plus its representation head; returns ``(SegOutput, rep)``.
    ``rep_head`` None: the segmenter's own (the released decoder's ``SegOutput.rep``)."""

    def __init__(self, segmenter: nn.Module, rep_head: Optional[nn.Module]) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.rep_head = rep_head

    def forward(self, x: Tensor):
        out = self.segmenter(x)
        return out, out.rep if self.rep_head is None else self.rep_head(out.features)


def percentile(values: Tensor, q: float) -> Tensor:
    """``numpy.percentile(values, q)`` (linear interpolation) of a 1-d tensor, with no size limit."""
    n = values.numel()
    if n == 0:
        raise ValueError("percentile of an empty set")
    pos = min(max(q, 0.0), 100.0) / 100.0 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = values.kthvalue(lo + 1).values
    if hi == lo:
        return v_lo
    v_hi = values.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def entropy_masks(entropy: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """U2PL's entropy split of the valid pixels at ``α`` percent: ``kept`` (below the ``100 − α`` percentile: the
    unsupervised CE's pixels), ``reliable`` (at most the ``α`` percentile: unlabelled anchor candidates) and
    ``unreliable`` (at least the ``100 − α`` percentile: negative candidates)."""
    values = entropy[valid]
    if values.numel() == 0:
        return valid, valid, valid
    high = percentile(values, 100.0 - alpha)
    return (entropy < high) & valid, (entropy <= percentile(values, alpha)) & valid, (entropy >= high) & valid


def half_area_boxes(batch: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """U2PL's CutMix boxes: per image, area ``H·W/2``, width uniform in ``[⌊W/2⌋ + 1, W)``, uniform position."""
    boxes = torch.zeros(batch, height, width, dtype=torch.bool)
    area = height * width / 2
    for i in range(batch):
        low = width // 2 + 1
        w = int(torch.randint(low, width, (1,), generator=generator)) if low < width else width
        h = min(int(round(area / w)), height)
        x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        boxes[i, y0:y0 + h, x0:x0 + w] = True
    return boxes


def class_ranks(prob: Tensor) -> Tensor:
    """``rank[b, c, i, j]`` = position of class ``c`` in pixel ``(i, j)``'s prediction sorted by decreasing
    probability (0 = the argmax); ties keep the lower class index first."""
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    positions = torch.arange(prob.shape[1], device=prob.device).view(1, -1, 1, 1).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def negative_masks(ranks_l: Tensor, labels_l: Tensor, ranks_u: Tensor, unreliable_u: Tensor, low_rank: int,
                   high_rank: int) -> Tensor:
    """``(C, B_l + B_u, h, w)`` bool: which pixels are negatives of each class (the paper's Eq. 10-12).

    Labelled: label ≠ c (and not ignored) and ``rank(c) < low_rank``. Unlabelled: unreliable and
    ``low_rank ≤ rank(c) < high_rank``.
    """
    num_classes = ranks_l.shape[1] if ranks_l.numel() else ranks_u.shape[1]
    classes = torch.arange(num_classes, device=labels_l.device).view(-1, 1, 1, 1)
    neg_l = (ranks_l.transpose(0, 1) < low_rank) & (labels_l[None] != classes) & (labels_l[None] != 255)
    r_u = ranks_u.transpose(0, 1)
    neg_u = (r_u >= low_rank) & (r_u < high_rank) & unreliable_u[None]
    return torch.cat([neg_l, neg_u], dim=1)


@torch.no_grad()
def gather_keys(keys: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Under ``torch.distributed``, every rank's negative keys (``keys``: the classes' keys concatenated, ``counts``
    per class), so that every rank's queues hold the keys of the global batch, as the released memory bank does;
    returned class by class (class 0 of every rank in rank order, then class 1, ...). Unchanged on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, counts
    world = dist.get_world_size()
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts.contiguous())
    totals = [int(c.sum()) for c in all_counts]
    padded = keys.new_zeros(max(max(totals), 1), keys.shape[1])
    padded[:keys.shape[0]] = keys
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    per_rank = [g[:t].split(c.tolist()) for g, t, c in zip(gathered, totals, all_counts, strict=True)]
    out = [torch.cat([pieces[k] for pieces in per_rank]) for k in range(counts.numel())]
    return torch.cat(out), torch.stack(all_counts).sum(dim=0)


def contrastive_term(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """``mean_a CE(cos(a, [p, n_a1 .. n_aK]) / τ, 0)``; anchors ``(A, D)``, positive ``(D,)``, negatives
    ``(A, K, D)``."""
    anchors, positive, negatives = anchors.float(), positive.float(), negatives.float()  # one dtype under autocast
    keys = torch.cat([positive.view(1, 1, -1).expand(anchors.shape[0], 1, -1), negatives], dim=1)
    logits = F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2) / temperature
    return F.cross_entropy(logits, torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device))


class U2PL(MeanTeacherFramework):
    name = "u2pl"
    #: static_graph: the representation head takes no gradient during the supervised-only phase
    traits = replace(MeanTeacherFramework.traits, geometry=TENSOR_GEOMETRY, static_graph=False,
                     strong_views=False)

    def __init__(self, config: Config, model: nn.Module, ctx: FrameworkContext) -> None:
        cfg, num_classes = config.u2pl, ctx.num_classes
        #: hafis's head on the decoder feature, or None where the segmenter has the released one (on the decoder's
        #: 512-channel concatenation, ``model.decoder: released``)
        self.rep_head = None if getattr(model, "has_representation", False) else \
            RepresentationHead(config.model.feature_dim, cfg.rep_dim)
        super().__init__(config, model, ctx, student=SegmenterWithRepresentation(model, self.rep_head))
        #: per-class FIFO memories of negative keys (teacher representations): each grows to ``u2pl.queue_size``
        #: rows, then is a ring buffer whose oldest row ``queue_ptr[c]`` is overwritten next (no copy per iteration)
        self.queues: list[Tensor] = [torch.zeros(0, cfg.rep_dim) for _ in range(num_classes)]
        self.queue_ptr: list[int] = [0] * num_classes

    # ------------------------------------------------------------------------------------------ plumbing
    def teacher_segmenter(self) -> nn.Module:
        return self.teacher.module.segmenter

    def param_groups(self, lr: float, head_lr_multiplier: float, weight_decay: float) -> list[dict]:
        if self.rep_head is None:  # the segmenter's own, in its head group
            return []
        head_lr = lr * head_lr_multiplier
        return [dict(params=list(self.rep_head.parameters()), lr=head_lr, initial_lr=head_lr,
                     weight_decay=weight_decay)]

    def to(self, device: torch.device) -> "U2PL":
        super().to(device)
        self.queues = [q.to(device) for q in self.queues]
        return self

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rep_head": {} if self.rep_head is None else self.rep_head.state_dict(),
                "queues": [q.detach().cpu() for q in self.queues], "queue_ptr": list(self.queue_ptr)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.rep_head is not None:
            self.rep_head.load_state_dict(state["rep_head"])
        device = self.queues[0].device if self.queues else torch.device("cpu")
        self.queues = [q.to(device) for q in state["queues"]]
        self.queue_ptr = [int(p) for p in state["queue_ptr"]]

    def sup_only_iterations(self) -> int:
        n = self.config.u2pl.sup_only_iterations
        return self.epoch_length() if n is None else n

    def alpha(self, iteration: int) -> float:
        """``α_t = α_0 (1 − t / T)`` in percent."""
        return self.config.u2pl.alpha * (1.0 - iteration / self.config.train.iterations)

    def after_optimizer_step(self, iteration: int) -> None:
        t0 = self.sup_only_iterations()
        if iteration >= t0:
            self.update_teacher(self.teacher.warmup_decay(self.ema_updates, self.config.u2pl.ema_decay))

    # ------------------------------------------------------------------------------------------ queues
    @torch.no_grad()
    def enqueue(self, c: int, keys: Tensor) -> None:
        """Push ``keys`` into class ``c``'s memory, which keeps the newest ``u2pl.queue_size`` keys."""
        size = self.config.u2pl.queue_size
        keys = keys.detach().to(self.queues[c].dtype)[-size:]
        queue = self.queues[c]
        if queue.shape[0] < size:  # still growing
            room = size - queue.shape[0]
            queue = self.queues[c] = torch.cat([queue, keys[:room]])
            keys = keys[room:]
            self.queue_ptr[c] = 0
        n = keys.shape[0]
        if n == 0:
            return
        ptr = self.queue_ptr[c]
        first = min(n, size - ptr)
        queue[ptr:ptr + first] = keys[:first]
        queue[:n - first] = keys[first:]
        self.queue_ptr[c] = (ptr + n) % size

    def queue(self, c: int) -> Tensor:
        """Class ``c``'s keys, oldest first."""
        q, ptr = self.queues[c], self.queue_ptr[c]
        return torch.cat([q[ptr:], q[:ptr]])

    # --------------------------------------------------------------------------------------------- step
    def train_step(self, labelled: LabelledBatch, unlabelled: Optional[UnlabelledBatch], iteration: int) -> StepOutput:
        cfg = self.config.u2pl
        x, y = labelled["image"], labelled["mask"]
        t0 = self.sup_only_iterations()
        if iteration < t0:
            out_x = self.model(x)
            loss_x = labelled_loss(out_x.logits, out_x.aux, y, self.config)
            return StepOutput(loss_x, {"loss_x": loss_x.detach()})
        if iteration == t0:
            self.teacher.copy_from(self.student)

        u, ignore = unlabelled["weak"], unlabelled["ignore"]
        n_l, n_u = x.shape[0], u.shape[0]
        with torch.no_grad():
            out_w, _ = self.teacher(u)
            conf_w, pseudo_w = out_w.logits.softmax(dim=1).max(dim=1)

        box = None
        if float(self.rand(1)) < cfg.cutmix_prob:
            box = half_area_boxes(n_u, u.shape[-2], u.shape[-1], self.generator).to(u.device)
        partner = partner_index(n_u, u.device)

        def mix(t: Tensor) -> Tensor:
            return t if box is None else paste(t, t[partner], box)

        u_mix, pseudo, ignore_mix = mix(u), mix(pseudo_w), mix(ignore)

        out, rep = self.student(torch.cat([x, u_mix]))
        pred_x, pred_u = out.logits.split([n_l, n_u])
        loss_x = labelled_loss(pred_x, None if out.aux is None else out.aux[:n_l], y, self.config)

        with torch.no_grad():
            out_t, rep_t = self.teacher(torch.cat([x, u_mix]))
            logits_tl, logits_tu = out_t.logits.split([n_l, n_u])
            self.weighting.update(out_t.features[:n_l], logits_tl, y, out_w.features, conf_w, pseudo_w, ignore,
                                  unlabelled.get("box_mask"))
            w = self.weighting.weights(out_w.features, pseudo_w, conf_w)
            w_mix = None if w is None else mix(w)

            alpha = self.alpha(iteration)
            valid = ignore_mix != 255
            kept, reliable, unreliable = entropy_masks(softmax_entropy(logits_tu.softmax(dim=1)), valid, alpha)
        scale = valid.sum() / kept.sum().clamp_min(1)
        loss_u = self.weighting.loss(pred_u, pseudo, w_mix, kept, kept) * scale

        loss_c = self.contrastive_loss(rep, rep_t.detach(), out_t.logits.detach(), y, pseudo, reliable, unreliable)
        loss = loss_x + cfg.unsup_weight * loss_u + cfg.contrastive_weight * loss_c

        terms = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_contra": loss_c.detach(),
                 "mask_ratio": kept.sum() / valid.sum().clamp_min(1), "alpha": torch.tensor(alpha)}
        if w_mix is not None:
            terms["weight_mean"] = (w_mix * kept).sum() / kept.sum().clamp_min(1)
        return StepOutput(loss, terms)

    # ------------------------------------------------------------------------------------- contrastive
    def contrastive_loss(self, rep: Tensor, rep_t: Tensor, logits_t: Tensor, labels_l: Tensor, pseudo_u: Tensor,
                         reliable_u: Tensor, unreliable_u: Tensor) -> Tensor:
        """The contrastive term of step 5. ``rep``/``rep_t``: student/teacher representations ``(B_l + B_u, R, h, w)``;
        ``logits_t``: teacher logits at input size; labels, pseudo-labels and masks at input size."""
        cfg = self.config.u2pl
        n_l = labels_l.shape[0]
        size = rep.shape[-2:]

        def down(t: Tensor) -> Tensor:
            return F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]

        with torch.no_grad():
            prob = F.interpolate(logits_t, size=size, mode="bilinear",
                                 align_corners=getattr(self.model, "align_corners", False)).softmax(dim=1)
            labels = down(torch.cat([labels_l, pseudo_u])).long()
            candidate = down(torch.cat([labels_l != 255, reliable_u])).bool()
            ranks = class_ranks(prob)
            negatives = negative_masks(ranks[:n_l], labels[:n_l], ranks[n_l:], down(unreliable_u).bool(),
                                       cfg.low_rank, cfg.high_rank)

        rep_pix = rep.permute(0, 2, 3, 1)
        rep_t_pix = rep_t.permute(0, 2, 3, 1)
        keys = [rep_t_pix[negatives[c]] for c in range(self.num_classes)]
        counts = torch.tensor([k.shape[0] for k in keys], device=rep.device)
        keys, counts = gather_keys(torch.cat(keys), counts)
        for c, keys_c in enumerate(keys.split(counts.tolist())):
            self.enqueue(c, keys_c)
        present = [c for c in range(self.num_classes) if bool((candidate & (labels == c)).any())]
        zero = rep.sum() * 0.0
        if len(present) <= 1:
            return zero
        total = zero
        for c in present:
            cand_c = candidate & (labels == c)
            anchors_c = rep_pix[cand_c & (prob[:, c] > cfg.anchor_threshold)]
            queue = self.queues[c]
            if anchors_c.shape[0] == 0 or queue.shape[0] == 0:
                continue
            positive = rep_t_pix[cand_c].mean(dim=0)
            a_idx = self.randint(0, anchors_c.shape[0], cfg.num_anchors, device=rep.device)
            n_idx = self.randint(0, queue.shape[0], cfg.num_anchors * cfg.num_negatives, device=rep.device)
            negs = queue[n_idx].view(cfg.num_anchors, cfg.num_negatives, -1)
            total = total + contrastive_term(anchors_c[a_idx], positive, negs, cfg.temperature)
        return total / len(present)
