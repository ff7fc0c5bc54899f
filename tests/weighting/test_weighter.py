import math

import pytest
import torch
import torch.nn.functional as F

from hafis.weighting import PseudoLabelWeighter, topk_index_similarity, weighted_cross_entropy


def one_hot_features(top_channels, dim=6):
    """(1, D, 1, n) features whose top-2 channels are the given pairs."""
    feats = torch.zeros(1, dim, 1, len(top_channels))
    for i, (a, b) in enumerate(top_channels):
        feats[0, a, 0, i] = 2.0
        feats[0, b, 0, i] = 1.0
    return feats


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_weights_exact_on_a_hand_made_example(offset):
    weighter = PseudoLabelWeighter(num_classes=3, feature_dim=6, k=2, offset=offset, samples_per_class=8)
    # class 0's prototype has top-2 channels {0, 1}; class 2's {4, 5}; class 1 has no prototype
    weighter.update_labelled(one_hot_features([(0, 1), (1, 0), (5, 4)]), torch.tensor([[[0, 0, 2]]]))
    feats = one_hot_features([(0, 1), (1, 2), (3, 4), (0, 1), (4, 0), (0, 1)])
    pseudo = torch.tensor([[[0, 0, 0, 1, 2, 255]]])
    w = weighter.weights(feats, pseudo)
    expected_s = torch.tensor([[[2, 1, 0, 0, 1, 0]]]).float()
    assert torch.equal(w, offset + expected_s / 2)


def test_weights_agree_with_topk_index_similarity_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    weighter = PseudoLabelWeighter(num_classes=4, feature_dim=16, k=5, samples_per_class=16)
    weighter.update_labelled(torch.randn(2, 16, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g))
    feats = torch.randn(3, 16, 5, 5, generator=g)
    pseudo = torch.randint(0, 4, (3, 5, 5), generator=g)
    protos, _ = weighter.bank.prototypes()
    rows = feats.permute(0, 2, 3, 1).reshape(-1, 16)
    expected = topk_index_similarity(rows, protos[pseudo.flatten()], 5).view(3, 5, 5)
    assert torch.equal(weighter.weights(feats, pseudo), expected)


@pytest.mark.parametrize("align", ["bilinear", "nearest"])
def test_features_are_resized_to_the_labels(align):
    g = torch.Generator().manual_seed(1)
    weighter = PseudoLabelWeighter(num_classes=3, feature_dim=8, k=3, align=align, samples_per_class=32)
    weighter.update_labelled(torch.randn(2, 8, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g))
    small = torch.randn(2, 8, 4, 4, generator=g)
    pseudo = torch.randint(0, 3, (2, 8, 8), generator=g)
    kwargs = {"align_corners": True} if align == "bilinear" else {}
    big = F.interpolate(small, size=(8, 8), mode=align, **kwargs)
    w_small = weighter.weights(small, pseudo)
    assert w_small.shape == (2, 8, 8)
    assert torch.equal(w_small, weighter.weights(big, pseudo))


def test_no_prototype_at_all_gives_offset():
    weighter = PseudoLabelWeighter(num_classes=2, feature_dim=4, k=2, offset=1.0)
    w = weighter.weights(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    assert torch.equal(w, torch.ones(1, 3, 3))


def test_bad_input_names_the_argument():
    weighter = PseudoLabelWeighter(num_classes=2, feature_dim=4, k=2)
    with pytest.raises(ValueError, match="pseudo_labels contains 7"):
        weighter.weights(torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), 7))
    with pytest.raises(ValueError, match="feature_dim=4"):
        weighter.weights(torch.randn(1, 5, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="k=5"):
        PseudoLabelWeighter(num_classes=2, feature_dim=4, k=5)
    with pytest.raises(ValueError, match="align"):
        PseudoLabelWeighter(num_classes=2, feature_dim=4, k=2, align="bicubic")


def ce(logits, t):
    return -logits[t] + math.log(sum(math.exp(v) for v in logits))


def test_weighted_cross_entropy_both_normalisations_by_hand():
    pix = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    logits = torch.tensor(pix).T[None, :, None, :]  # (1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 1, 255]]])
    weight = torch.tensor([[[0.5, 1.0, 0.25, 2.0]]])
    mask = torch.tensor([[[True, False, True, True]]])
    losses = [ce(pix[i], [0, 0, 1][i]) for i in range(3)]
    num = 0.5 * losses[0] + 0.25 * losses[2]
    got = weighted_cross_entropy(logits, target, weight, mask, normalize="count")
    assert got.item() == pytest.approx(num / 2, rel=1e-6)
    got = weighted_cross_entropy(logits, target, weight, mask, normalize="weight")
    assert got.item() == pytest.approx(num / 0.75, rel=1e-6)
    # UniMatch-style normaliser: all non-ignored pixels, confident or not
    denominator = torch.ones_like(mask)
    got = weighted_cross_entropy(logits, target, weight, mask, "count", denominator_mask=denominator)
    assert got.item() == pytest.approx(num / 3, rel=1e-6)
    got = weighted_cross_entropy(logits, target, weight, mask, "weight", denominator_mask=denominator)
    assert got.item() == pytest.approx(num / 1.75, rel=1e-6)
    plain = weighted_cross_entropy(logits, target)
    assert plain.item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)


def test_weighted_cross_entropy_empty_mask_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = weighted_cross_entropy(logits, target, torch.zeros(1, 2, 2), normalize="weight")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="normalize"):
        weighted_cross_entropy(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), normalize="sum")
    with pytest.raises(ValueError, match="weight must"):
        weighted_cross_entropy(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 3, 3))


def _reference_weights(features, pseudo, prototypes, has_prototype, k):
    """The authors' recipe written out independently: upsample with align_corners=True (float32), rank every
    pixel's channels by value with ties to the lower index (a stable sort), count shared top-k channels."""
    H, W = pseudo.shape[-2:]
    up = F.interpolate(features.float(), size=(H, W), mode="bilinear", align_corners=True)
    pix = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])
    top_pix = torch.sort(-pix, dim=1, stable=True).indices[:, :k]
    top_proto = torch.sort(-prototypes, dim=1, stable=True).indices[:, :k]
    labels = pseudo.flatten()
    shared = (top_pix[:, :, None] == top_proto[labels][:, None, :]).sum(dim=(1, 2))
    shared = shared * has_prototype[labels]
    return (shared.float() / k).view(pseudo.shape)


def test_native_resolution_weights_equal_an_align_corners_reference():
    g = torch.Generator().manual_seed(3)
    weighter = PseudoLabelWeighter(num_classes=3, feature_dim=16, k=5, samples_per_class=64)
    # quantised values: many exact ties between channels, which must go to the lower index
    weighter.update_labelled(torch.randint(0, 4, (2, 16, 6, 6), generator=g).float(),
                             torch.randint(0, 2, (2, 6, 6), generator=g))
    feats = torch.randint(0, 4, (2, 16, 5, 7), generator=g).float()  # stride-4-like: labels at 17 x 25
    pseudo = torch.randint(0, 3, (2, 17, 25), generator=g)
    protos, has = weighter.bank.prototypes()
    expected = _reference_weights(feats, pseudo, protos, has, 5)
    assert torch.equal(weighter.weights(feats, pseudo), expected)
    # align_corners=False resamples elsewhere: the two conventions give different W on this input
    other = PseudoLabelWeighter(num_classes=3, feature_dim=16, k=5, samples_per_class=64, align_corners=False)
    other.bank.load_state_dict(weighter.bank.state_dict())
    assert not torch.equal(other.weights(feats, pseudo), expected)


def test_half_precision_features_are_ranked_in_float32():
    g = torch.Generator().manual_seed(4)
    weighter = PseudoLabelWeighter(num_classes=2, feature_dim=32, k=5, samples_per_class=64)
    weighter.update_labelled(torch.rand(1, 32, 8, 8, generator=g), torch.randint(0, 2, (1, 8, 8), generator=g))
    feats = torch.rand(2, 32, 4, 4, generator=g).bfloat16()
    pseudo = torch.randint(0, 2, (2, 16, 16), generator=g)
    protos, has = weighter.bank.prototypes()
    expected = _reference_weights(feats.float(), pseudo, protos, has, 5)
    assert torch.equal(weighter.weights(feats, pseudo), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(weighter.weights(feats, pseudo), expected)
