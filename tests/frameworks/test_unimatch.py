import pytest
import torch
import torch.nn.functional as F

from hafis.frameworks.base import FrameworkContext
from hafis.frameworks.mixing import partner_index, paste
from hafis.frameworks.unimatch import UniMatch

C = 3


def make_batch(seed=0, n=2, size=4):
    g = torch.Generator().manual_seed(seed)
    box1 = torch.zeros(n, size, size, dtype=torch.bool)
    box1[0, :2, :2] = True
    box2 = torch.zeros(n, size, size, dtype=torch.bool)
    box2[1, 1:, 2:] = True
    ignore = torch.zeros(n, size, size, dtype=torch.long)
    ignore[1, 3, :] = 255
    labelled = {"image": torch.randn(n, 3, size, size, generator=g),
                "mask": torch.randint(0, C, (n, size, size), generator=g)}
    labelled["mask"][0, 0, 0] = 255
    unlabelled = {"weak": torch.randn(n, 3, size, size, generator=g),
                  "strong1": torch.randn(n, 3, size, size, generator=g),
                  "strong2": torch.randn(n, 3, size, size, generator=g), "ignore": ignore, "box1": box1, "box2": box2}
    return labelled, unlabelled


@pytest.fixture
def framework(stub_segmenter, stub_config):
    """``framework(threshold=0.0, **weighting)``: UniMatch on the stub segmenter (scale 20: confident logits; the
    feature-perturbed view is the convolution of the image halved)."""

    def make(threshold=0.0, **weighting):
        config = stub_config(f"unimatch.threshold={threshold}", "unimatch.mix=in_batch",
                             *(f"weighting.{k}={v}" for k, v in weighting.items()))
        return UniMatch(config, stub_segmenter(C, scale=20, fp_scale=0.5), FrameworkContext(C))

    return make


def mixed(t, box, partner):
    out = t.clone()
    for i in range(t.shape[0]):
        if t.dim() == 4:
            out[i][:, box[i]] = t[partner[i]][:, box[i]]
        else:
            out[i][box[i]] = t[partner[i]][box[i]]
    return out


def hand_loss(model, labelled, unlabelled, weight=None, normalize="count", threshold=0.0):
    """The UniMatch formula written out with plain per-pixel CE and explicit loops for CutMix."""
    partner = [1, 0]
    x, y, u_w = labelled["image"], labelled["mask"], unlabelled["weak"]
    ign = unlabelled["ignore"]
    pred_w = model.conv(u_w)
    conf, pseudo = pred_w.softmax(1).max(1)
    w = torch.ones_like(conf) if weight is None else weight
    loss_x = F.cross_entropy(model.conv(x), y, ignore_index=255)

    def term(logits, target, c, ig, ww):
        ce = F.cross_entropy(logits, target, reduction="none")
        valid = (ig != 255).float()
        m = valid * (c >= threshold).float()
        z = valid.sum() if normalize == "count" else (ww * valid).sum()
        return (ww * m * ce).sum() / z

    terms = []
    for key, box in (("strong1", unlabelled["box1"]), ("strong2", unlabelled["box2"])):
        img = mixed(unlabelled[key], box, partner)
        terms.append(term(model.conv(img), mixed(pseudo, box, partner), mixed(conf, box, partner),
                          mixed(ign, box, partner), mixed(w, box, partner)))
    terms.append(term(model.conv(u_w * 0.5), pseudo, conf, ign, w))
    return (loss_x + 0.25 * terms[0] + 0.25 * terms[1] + 0.5 * terms[2]) / 2, terms


def test_loss_equals_the_formula_without_weighting(framework):
    fw = framework(threshold=0.0)
    labelled, unlabelled = make_batch()
    out = fw.train_step(labelled, unlabelled, 0)
    expected, terms = hand_loss(fw.model, labelled, unlabelled)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, t in zip(("loss_s1", "loss_s2", "loss_fp"), terms, strict=True):
        assert out.terms[name].item() == pytest.approx(t.item(), rel=1e-5)


def test_threshold_masks_pixels_but_keeps_the_normaliser(framework):
    fw = framework(threshold=0.999)
    labelled, unlabelled = make_batch(seed=3)
    out = fw.train_step(labelled, unlabelled, 0)
    expected, _ = hand_loss(fw.model, labelled, unlabelled, threshold=0.999)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_known_weights_scale_each_unsupervised_term(framework, normalize, monkeypatch):
    fw = framework(threshold=0.0, enabled="true", normalize=normalize)
    labelled, unlabelled = make_batch(seed=1)
    g = torch.Generator().manual_seed(7)
    w = torch.randint(0, 3, (2, 4, 4), generator=g).float() / 2  # known W in {0, 0.5, 1}
    monkeypatch.setattr(fw.weighting, "weights", lambda features, pseudo, confidence=None: w)
    out = fw.train_step(labelled, unlabelled, 0)
    expected, terms = hand_loss(fw.model, labelled, unlabelled, weight=w, normalize=normalize)
    for name, t in zip(("loss_s1", "loss_s2", "loss_fp"), terms, strict=True):
        assert out.terms[name].item() == pytest.approx(t.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_constant_weight_halves_the_unsupervised_terms(framework, monkeypatch):
    labelled, unlabelled = make_batch(seed=2)
    plain = framework(threshold=0.0).train_step(labelled, unlabelled, 0)
    fw = framework(threshold=0.0, enabled="true")
    monkeypatch.setattr(fw.weighting, "weights", lambda features, pseudo, confidence=None: torch.full((2, 4, 4), 0.5))
    weighted = fw.train_step(labelled, unlabelled, 0)
    for name in ("loss_s1", "loss_s2", "loss_fp"):
        assert weighted.terms[name].item() == pytest.approx(0.5 * plain.terms[name].item(), rel=1e-6)
    assert weighted.terms["loss_x"].item() == plain.terms["loss_x"].item()


def test_cutmix_moves_labels_and_weights_with_the_box():
    partner = partner_index(3, torch.device("cpu"))
    assert partner.tolist() == [1, 2, 0]
    labels = torch.arange(3).view(3, 1, 1).expand(3, 2, 2).clone()
    weights = labels.float() / 10
    images = labels[:, None].float().expand(3, 3, 2, 2)
    box = torch.zeros(3, 2, 2, dtype=torch.bool)
    box[0, 0, 1] = True
    box[2, 1, :] = True
    mixed_labels = paste(labels, labels[partner], box)
    assert mixed_labels.tolist() == [[[0, 1], [0, 0]], [[1, 1], [1, 1]], [[2, 2], [0, 0]]]
    assert torch.equal(paste(weights, weights[partner], box), mixed_labels.float() / 10)
    assert torch.equal(paste(images, images[partner], box)[:, 0], mixed_labels.float())


def test_weight_identically_one_leaves_the_loss_unchanged(framework):
    """offset 1 with no prototype yet gives W = 1 everywhere: the plug-in path must reproduce the plain loss."""
    labelled, unlabelled = make_batch(seed=4)
    plain = framework(threshold=0.5).train_step(labelled, unlabelled, 0)
    fw = framework(threshold=0.5, enabled="true", offset=1, labelled_threshold=1.0)
    fw.weighting.config.tau_seg = 1.1  # beyond the config's range, set directly: no unlabelled pixel is reliable
    weighted = fw.train_step(labelled, unlabelled, 0)
    assert not bool(fw.weighting.weighter.bank.prototypes()[1].any())
    assert weighted.terms["weight_mean"].item() == 1.0
    assert torch.equal(weighted.loss, plain.loss)


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_bank_view_feeds_the_unlabelled_queue_from_that_view(framework, view):
    # the stub's features are its input pixels, so every queued vector names the view it came from
    fw = framework(threshold=0.0, enabled="true", bank_view=view, tau_seg=0.0, samples_per_class=64,
                   memory_per_class=64)
    labelled, unlabelled = make_batch(seed=5)
    fw.train_step(labelled, unlabelled, 0)
    partner = partner_index(2, torch.device("cpu"))
    strong = torch.cat([paste(unlabelled[k], unlabelled[k][partner], unlabelled[b])
                        for k, b in (("strong1", "box1"), ("strong2", "box2"))])
    pixels = {"weak": unlabelled["weak"], "strong": strong}
    valid = {"weak": unlabelled["ignore"] != 255,
             "strong": torch.cat([paste(unlabelled["ignore"], unlabelled["ignore"][partner], unlabelled[b])
                                  for b in ("box1", "box2")]) != 255}
    bank = fw.weighting.weighter.bank
    stored = torch.cat([bank.unlabelled.contents(c) for c in range(C)])
    assert len(stored) > 0
    for name in ("weak", "strong"):
        candidates = pixels[name].permute(0, 2, 3, 1)[valid[name]]
        found = (stored[:, None, :] == candidates[None]).all(-1).any(1)
        assert bool(found.all()) == (name == view)
