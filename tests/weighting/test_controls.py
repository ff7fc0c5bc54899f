"""The weighting's controls: W shuffled within pseudo-label classes, the confidence in place of s/k."""

import math
from collections import Counter

import pytest
import torch

import hafis.frameworks.base as base
from hafis.config import ConfigError, load_config
from hafis.frameworks.base import PseudoLabelWeighting
from hafis.weighting.controls import shuffle_within_classes


def _weighting(**kw):
    config = load_config(None, ["weighting.enabled=true", "weighting.reliable=confidence", "weighting.k=2",
                                *(f"weighting.{k}={v}" for k, v in kw.items())]).weighting
    return PseudoLabelWeighting(config, 3, 4, seed=0)


def _case():
    """2 x 3 x 4 pixels: distinct weights 0.00 .. 0.23, classes 0-2 and ignored ones, an eligibility mask."""
    weight = torch.arange(24, dtype=torch.float32).view(2, 3, 4) / 100
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 0, 255], [1, 0, 2, 2]],
                           [[0, 1, 1, 255], [2, 0, 0, 1], [1, 2, 0, 0]]])
    eligible = torch.ones(2, 3, 4, dtype=torch.bool)
    eligible[0, 0, 0] = eligible[1, 1, 2] = eligible[0, 2, 2] = False  # e.g. below the confidence threshold
    eligible &= labels != 255
    return weight, labels, eligible


def _by_class(weight, labels, eligible):
    """class -> multiset of the eligible pixels' weights (plain Python)."""
    out = {}
    for w, c, e in zip(weight.flatten().tolist(), labels.flatten().tolist(), eligible.flatten().tolist(), strict=True):
        if e:
            out.setdefault(c, Counter())[w] += 1
    return out


def test_the_shuffle_keeps_each_classs_weights_and_moves_some():
    weight, labels, eligible = _case()
    out = shuffle_within_classes(weight, labels, eligible, torch.Generator().manual_seed(0))
    assert out.shape == weight.shape and out.dtype == weight.dtype
    assert _by_class(out, labels, eligible) == _by_class(weight, labels, eligible)
    assert torch.equal(out[~eligible], weight[~eligible])  # ineligible and ignored pixels keep their own
    assert bool((out != weight).any())
    # the same generator state draws the same permutation; another one another
    again = shuffle_within_classes(weight, labels, eligible, torch.Generator().manual_seed(0))
    other = shuffle_within_classes(weight, labels, eligible, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_a_class_with_one_eligible_pixel_keeps_its_weight():
    weight = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    labels = torch.tensor([[[0, 1, 1, 0]]])
    eligible = torch.tensor([[[True, True, True, False]]])
    for seed in range(5):
        out = shuffle_within_classes(weight, labels, eligible, torch.Generator().manual_seed(seed))
        assert out[0, 0, 0] == 0.1 and out[0, 0, 3] == 0.4
        assert sorted(out[0, 0, 1:3].tolist()) == pytest.approx([0.2, 0.3])


def test_the_loss_shuffles_among_the_pixels_it_counts(monkeypatch):
    """The weight the loss multiplies by: permuted within the target's classes among mask > 0 and non-ignored
    pixels, per call; the other pixels (they may still count in a weight normaliser) keep theirs."""
    seen = []
    real = base.weighted_cross_entropy
    monkeypatch.setattr(base, "weighted_cross_entropy",
                        lambda logits, t, w, *a: seen.append(w) or real(logits, t, w, *a))
    weight, labels, eligible = _case()
    mask = eligible.float() * 0.5 + (labels == 255).float()  # a float mask (AEL's); the ignored pixels never count
    logits = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(0))
    fw = _weighting(shuffle="true", offset=1, normalize="weight")
    fw.loss(logits, labels, weight, mask, torch.ones_like(mask))
    fw.loss(logits, labels, weight, mask, torch.ones_like(mask))
    first, second = seen
    for w in seen:
        assert _by_class(w, labels, eligible) == _by_class(weight, labels, eligible)
        assert torch.equal(w[~eligible], weight[~eligible])
    assert not torch.equal(first, weight) and not torch.equal(first, second)  # each term its own permutation
    assert fw.shuffle_draws == 2


def test_the_shuffle_changes_no_loss_whose_pixels_of_a_class_agree():
    """Σ W ℓ / Σ W over a class is unchanged by a permutation when every pixel of the class has the same loss."""
    weight, labels, eligible = _case()
    logits = torch.zeros(2, 3, 3, 4)  # every pixel the same prediction: the CE depends on the class only
    logits[:, 1] = 1.0
    plain, shuffled = _weighting(offset=1, normalize="weight"), _weighting(shuffle="true", offset=1,
                                                                            normalize="weight")
    mask = eligible.float()
    a = plain.loss(logits, labels, weight, mask, mask)
    b = shuffled.loss(logits, labels, weight, mask, mask)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    # with different losses within a class the permutation shows
    logits = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(3)) * 3
    assert shuffled.loss(logits, labels, weight, mask, mask).item() != pytest.approx(
        plain.loss(logits, labels, weight, mask, mask).item(), rel=1e-6)


def test_a_resumed_run_replays_its_shuffles():
    weight, labels, eligible = _case()
    logits = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(1)) * 3
    mask = eligible.float()
    run = _weighting(shuffle="true")
    run.loss(logits, labels, weight, mask)
    state = run.state_dict()
    expected = run.loss(logits, labels, weight, mask)
    resumed = _weighting(shuffle="true")
    resumed.load_state_dict(state)
    assert resumed.shuffle_draws == 1 and torch.equal(resumed.loss(logits, labels, weight, mask), expected)
    fresh = _weighting(shuffle="true")  # without the state: the first draw again
    assert not torch.equal(fresh.loss(logits, labels, weight, mask), expected)
    # without the shuffle the state is the weighter's alone, as before
    assert "shuffle_draws" not in _weighting().state_dict()
    assert set(_weighting().state_dict()) == set(state) - {"shuffle_draws"}


def test_the_confidence_weight_is_the_offset_plus_the_softmax_maximum():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[-1.0, 3.0]]]])  # (1, 3 classes, 1, 2)
    conf, pseudo = logits.softmax(dim=1).max(dim=1)
    fw = _weighting(signal="confidence", offset=1, normalize="weight")
    features = torch.randn(1, 4, 1, 2)  # not read
    w = fw.weights(features, pseudo, conf)
    # by hand: pixel 0 has logits (2, 0, -1), pixel 1 (0, 0, 3)
    q0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    q1 = math.exp(3) / (2 + math.exp(3))
    assert w.dtype == torch.float32 and w.shape == (1, 1, 2)
    assert w.flatten().tolist() == pytest.approx([1 + q0, 1 + q1], rel=1e-6)
    offset0 = _weighting(signal="confidence").weights(features, pseudo, conf)
    assert offset0.flatten().tolist() == pytest.approx([q0, q1], rel=1e-6)
    with pytest.raises(ValueError, match="weighting.signal is 'confidence'"):
        fw.weights(features, pseudo)


def test_the_default_signal_is_the_similarity_and_a_bad_value_names_the_key():
    fw = _weighting()
    assert (fw.config.signal, fw.config.shuffle) == ("similarity", False)
    features, pseudo = torch.rand(1, 4, 1, 2), torch.tensor([[[0, 1]]])
    assert torch.equal(fw.weights(features, pseudo, torch.ones(1, 1, 2)), fw.weighter.weights(features, pseudo))
    with pytest.raises(ConfigError, match="weighting.signal"):
        load_config(None, ["weighting.signal=confident"])
