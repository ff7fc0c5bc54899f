import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hafis.frameworks.base import FrameworkContext
from hafis.frameworks.u2pl import (
    U2PL,
    class_ranks,
    contrastive_term,
    entropy_masks,
    half_area_boxes,
    negative_masks,
    percentile,
)


@pytest.fixture
def u2pl(stub_segmenter, stub_config):
    """``u2pl(classes=3, **overrides)``: U2PL on the stub segmenter (confident logits: scale 3)."""

    def make(classes=3, **overrides):
        config = stub_config("u2pl.rep_dim=2", *(f"{k}={v}" for k, v in overrides.items()))
        return U2PL(config, stub_segmenter(classes, scale=3), FrameworkContext(classes))

    return make


def test_percentile_is_numpy_linear_interpolation():
    values = torch.tensor([0.1, 0.4, 0.2, 0.8, 0.5])
    for q in (0.0, 20.0, 80.0, 87.5, 100.0):
        assert percentile(values, q).item() == pytest.approx(float(np.percentile(values.numpy(), q)), abs=1e-7)
    assert percentile(values, 80.0).item() == pytest.approx(0.56)


def test_entropy_masks_split_at_the_alpha_percentiles():
    entropy = torch.arange(12, dtype=torch.float32).view(1, 3, 4) / 10  # 0.0 .. 1.1
    valid = torch.ones(1, 3, 4, dtype=torch.bool)
    valid[0, 2, 2:] = False  # 1.0 and 1.1 are ignored: the percentiles are over 0.0 .. 0.9
    kept, reliable, unreliable = entropy_masks(entropy, valid, alpha=20.0)
    # 80th percentile of 0.0..0.9 = 0.72, 20th = 0.18
    assert entropy[kept].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert entropy[reliable].tolist() == pytest.approx([0.0, 0.1])
    assert entropy[unreliable].tolist() == pytest.approx([0.8, 0.9])
    # α = 0 at the end of training: only the most uncertain pixel is dropped
    kept, reliable, unreliable = entropy_masks(entropy, valid, alpha=0.0)
    assert int(kept.sum()) == 9 and entropy[unreliable].tolist() == pytest.approx([0.9])


def test_alpha_decays_linearly_to_zero(u2pl):
    fw = u2pl(**{"train.iterations": 100, "u2pl.alpha": 20})
    assert [fw.alpha(t) for t in (0, 25, 50, 100)] == [20.0, 15.0, 10.0, 0.0]


def test_class_ranks():
    prob = torch.tensor([0.5, 0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    assert class_ranks(prob).flatten().tolist() == [0, 2, 1, 3]


def test_negatives_are_selected_by_rank_window():
    # one labelled and one unlabelled pixel; 6 classes; prediction order 2 > 0 > 5 > 1 > 4 > 3
    prob = torch.tensor([0.25, 0.1, 0.4, 0.01, 0.04, 0.2]).view(1, 6, 1, 1)
    ranks = class_ranks(prob)
    assert ranks.flatten().tolist() == [1, 3, 0, 5, 4, 2]
    label = torch.tensor([[[0]]])
    neg = negative_masks(ranks, label, ranks, torch.tensor([[[True]]]), low_rank=2, high_rank=5)
    labelled, unlabelled = neg[:, 0, 0, 0], neg[:, 1, 0, 0]
    # labelled: rank < 2 and not its own class 0 -> class 2 only
    assert labelled.nonzero().flatten().tolist() == [2]
    # unreliable unlabelled: rank in [2, 5) -> classes 5 (rank 2), 1 (rank 3), 4 (rank 4)
    assert unlabelled.nonzero().flatten().tolist() == [1, 4, 5]
    # a reliable unlabelled pixel and an ignored labelled one are nobody's negative
    neg = negative_masks(ranks, torch.tensor([[[255]]]), ranks, torch.tensor([[[False]]]), 2, 5)
    assert not neg.any()


def test_contrastive_term_against_hand_computation():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    positive = torch.tensor([2.0, 0.0])
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[0.0, -1.0], [1.0, 1.0]]])
    # anchor 1: cos = [1, 0, -1]; anchor 2: cos = [0, -1, 1/sqrt(2)]; temperature 0.5 doubles them
    l1 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    l2 = -math.log(1 / (1 + math.exp(-2) + math.exp(math.sqrt(2))))
    assert contrastive_term(anchors, positive, negatives, 0.5).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_contrastive_loss_end_to_end_on_a_two_pixel_batch(u2pl):
    fw = u2pl(classes=2, **{"u2pl.low_rank": 2, "u2pl.high_rank": 2, "u2pl.num_anchors": 3,
                            "u2pl.num_negatives": 2})
    # batch: one labelled image (pixels labelled 0, 1) and one unlabelled image, 1x2 pixels, rep at full size
    rep = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]], [[[5.0, 5.0]], [[5.0, 5.0]]]])  # student s0=(1,0), s1=(0,2)
    rep_t = torch.tensor([[[[1.0, -1.0]], [[1.0, 1.0]]], [[[7.0, 7.0]], [[7.0, 7.0]]]])  # teacher t0=(1,1), t1=(-1,1)
    p = torch.tensor([[0.8, 0.1], [0.2, 0.9]]).log()  # class-major: pixel 0 -> class 0, pixel 1 -> class 1
    logits = torch.stack([p, p])[:, :, None, :]  # (2, C, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    off = torch.zeros(1, 1, 2, dtype=torch.bool)
    loss = fw.contrastive_loss(rep, rep_t, logits, labels, torch.tensor([[[0, 1]]]), off, off)
    # class 0: anchor s0, positive t0, negatives t1 twice (labelled pixel 1 ranks class 0 second); class 1:
    # anchor s1, positive t1, negatives t0 twice
    c0 = math.log(1 + 2 * math.exp(-2 * math.sqrt(2)))  # logits [sqrt2, -sqrt2, -sqrt2]
    c1 = math.log(3)  # cos(s1, t1) = cos(s1, t0) = 1/sqrt2
    assert loss.item() == pytest.approx((c0 + c1) / 2, rel=1e-6)
    assert fw.queues[0].tolist() == [[-1.0, 1.0]] and fw.queues[1].tolist() == [[1.0, 1.0]]
    # one class present: no loss
    loss = fw.contrastive_loss(rep, rep_t, logits, torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]]), off, off)
    assert loss.item() == 0.0


def test_queue_keeps_the_newest_keys(u2pl):
    fw = u2pl(**{"u2pl.queue_size": 3})

    def push(*values):
        fw.enqueue(1, torch.tensor([[v, v] for v in values]))
        return fw.queue(1)[:, 0].tolist()

    assert push(1.0, 2.0) == [1.0, 2.0]
    assert push(3.0, 4.0) == [2.0, 3.0, 4.0] and fw.queues[1][:, 0].tolist() == [4.0, 2.0, 3.0]  # a ring, in place
    assert push(5.0) == [3.0, 4.0, 5.0]
    assert push(6.0, 7.0, 8.0, 9.0) == [7.0, 8.0, 9.0]
    assert push() == [7.0, 8.0, 9.0] and fw.queues[0].shape == (0, 2)


def test_half_area_boxes():
    g = torch.Generator().manual_seed(3)
    boxes = half_area_boxes(20, 16, 16, g)
    for box in boxes:
        rows, cols = box.any(dim=1).sum().item(), box.any(dim=0).sum().item()
        assert 9 <= cols <= 15 and rows == round(128 / cols) and box.sum() == rows * cols


def make_batch(seed=0, n=2, size=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    ignore = torch.zeros(n, size, size, dtype=torch.long)
    ignore[1, 3, :] = 255
    labelled = {"image": torch.randn(n, 3, size, size, generator=g),
                "mask": torch.randint(0, classes, (n, size, size), generator=g)}
    unlabelled = {"weak": torch.randn(n, 3, size, size, generator=g), "ignore": ignore}
    return labelled, unlabelled


@pytest.mark.parametrize("normalize", ["count", "weight"])
@pytest.mark.parametrize("weighted", [False, True])
def test_unsupervised_loss_normaliser(u2pl, monkeypatch, weighted, normalize):
    """L_u = Σ_K W ℓ / Z · N / |K| with the teacher's entropy percentile (t = 0: α = 20)."""
    fw = u2pl(**{"u2pl.sup_only_iterations": 0, "u2pl.cutmix_prob": 0.0, "weighting.enabled": weighted,
                 "weighting.normalize": normalize})
    labelled, unlabelled = make_batch(seed=5)
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 3, (2, 4, 4), generator=g).float() / 2
    if weighted:
        monkeypatch.setattr(fw.weighting, "weights", lambda features, pseudo, confidence=None: w)
    out = fw.train_step(labelled, unlabelled, 0)
    with torch.no_grad():
        logits = fw.model.conv(unlabelled["weak"])  # teacher = student at the first semi-supervised step
    prob = logits.softmax(1)
    pseudo = prob.argmax(1)
    entropy = -(prob * torch.log(prob + 1e-10)).sum(1)
    valid = unlabelled["ignore"] != 255
    thresh = np.percentile(entropy[valid].numpy(), 80)
    kept = (entropy < float(thresh)) & valid
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    ww = w if weighted else torch.ones_like(w)
    z = kept.sum() if (normalize == "count" or not weighted) else (ww * kept).sum()
    expected = (ww * kept * ce).sum() / z * valid.sum() / kept.sum()
    assert out.terms["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.terms["mask_ratio"].item() == pytest.approx(kept.sum().item() / valid.sum().item())


def test_supervised_only_phase_then_teacher_copy(u2pl):
    fw = u2pl(**{"u2pl.sup_only_iterations": 2})
    labelled, unlabelled = make_batch()
    out = fw.train_step(labelled, unlabelled, 0)
    assert set(out.terms) == {"loss_x"} and fw.eval_model() is fw.model
    fw.after_optimizer_step(0)
    assert fw.ema_updates == 0
    with torch.no_grad():
        fw.model.conv.weight.add_(1.0)  # the student moved; the teacher has not followed yet
    fw.train_step(labelled, unlabelled, 2)  # first semi-supervised step: the teacher becomes the student
    assert torch.equal(fw.teacher.module.segmenter.conv.weight, fw.model.conv.weight)
    fw.after_optimizer_step(2)
    assert fw.ema_updates == 1 and fw.eval_model() is fw.teacher.module.segmenter
    assert len(fw.param_groups(0.1, 10.0, 1e-4)[0]["params"]) == 6 and fw.param_groups(0.1, 10, 0)[0]["lr"] == 1.0



def test_negative_keys_are_gathered_across_ranks(monkeypatch):
    """Two ranks, simulated: rank 0 holds 1 key of class 0 and 2 of class 1, rank 1 one key of class 1."""
    import hafis.frameworks.u2pl as mod

    other = {"counts": torch.tensor([0, 1]), "keys": torch.tensor([[10.0, 10.0]])}

    def all_gather(out, tensor):
        if tensor.dtype == torch.long:  # the counts
            out[0].copy_(tensor), out[1].copy_(other["counts"])
        else:  # the keys, padded to the longest rank's
            out[0].copy_(tensor)
            out[1].zero_()[:1] = other["keys"]

    monkeypatch.setattr(mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(mod.dist, "all_gather", all_gather)
    keys, counts = mod.gather_keys(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), torch.tensor([1, 2]))
    assert counts.tolist() == [1, 3]
    assert keys[:, 0].tolist() == [0.0, 1.0, 2.0, 10.0]  # class by class, ranks in order within a class
