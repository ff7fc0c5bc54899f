import math

import pytest
import torch
import torch.nn.functional as F

from hafis.data.transforms import normalize
from hafis.frameworks.augseg import (
    OP_NAMES,
    AugSeg,
    apply_intensity_ops,
    from_uint8,
    image_reliability,
    label_aided_cutmix,
    rand_boxes,
    sample_intensity_ops,
    to_uint8,
)
from hafis.frameworks.base import FrameworkContext


def draws(seed, n=200, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return [sample_intensity_ops(g, **kwargs) for _ in range(n)]


def test_op_sampling_counts_magnitudes_and_determinism():
    samples = draws(0)
    assert {len(ops) for ops in samples} == {1, 2, 3}
    names = {name for ops in samples for name, _ in ops}
    assert names == set(OP_NAMES) and len(OP_NAMES) == 11
    for ops in samples:
        for name, v in ops:
            if name in ("identity", "autocontrast", "equalize"):
                assert v is None
            elif name == "blur":
                assert 0.1 <= v <= 2.0
            elif name in ("contrast", "brightness", "color", "sharpness"):
                assert 0.05 < v <= 0.95
            elif name == "posterize":
                assert v in (4.0, 5.0, 6.0, 7.0)
            elif name == "solarize":
                assert v == int(v) and 1 <= v <= 255
            else:
                assert 0 < abs(v) <= 0.5
    # continuous magnitudes: the factors are (almost surely) all different
    factors = [v for ops in samples for name, v in ops if name == "contrast"]
    assert len(factors) > 5 and len(set(factors)) == len(factors)
    assert draws(0) == samples and draws(1) != samples
    assert {len(ops) for ops in draws(2, n=20, num_augs=2, random_num=False)} == {2}
    with pytest.raises(ValueError):
        sample_intensity_ops(torch.Generator(), num_augs=0)


def test_intensity_ops_on_a_known_image():
    img = torch.tensor([0, 17, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 6).expand(3, 2, 6).contiguous()
    assert torch.equal(apply_intensity_ops(img, [("identity", None)]), img)
    assert apply_intensity_ops(img, [("posterize", 4.0)])[0, 0].tolist() == [0, 16, 112, 128, 192, 240]
    assert apply_intensity_ops(img, [("solarize", 128.0)])[0, 0].tolist() == [0, 17, 127, 127, 55, 0]
    assert apply_intensity_ops(img, [("brightness", 0.5)])[0, 0].tolist() == [0, 8, 63, 64, 100, 127]
    out = apply_intensity_ops(img, [("posterize", 4.0), ("solarize", 128.0)])
    assert out[0, 0].tolist() == [0, 16, 112, 127, 63, 15]


def test_normalised_views_round_trip_to_exact_uint8():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 5, 5), generator=g, dtype=torch.uint8)
    batch = torch.stack([normalize(i) for i in img])
    assert torch.equal(to_uint8(batch), img)
    assert torch.allclose(from_uint8(img), batch, atol=1e-6)


def test_image_reliability():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    one_hot = F.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 4).permute(0, 3, 1, 2).float()
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    rel = image_reliability(torch.cat([uniform, one_hot, half]))
    # (1 - H / log C) * max p: 0, 1, and (1 - log2 / log4) * 0.5 = 0.25
    assert rel.tolist() == pytest.approx([0.0, 1.0, 0.25], abs=1e-6)


def test_rand_boxes_size_and_position():
    g = torch.Generator().manual_seed(0)
    boxes = rand_boxes(50, 16, 16, 0.75, g)  # cut ratio sqrt(0.25): 8 x 8 before clipping
    rows = boxes.any(dim=2).sum(dim=1)
    cols = boxes.any(dim=1).sum(dim=1)
    assert ((rows >= 1) & (rows <= 8) & (cols >= 1) & (cols <= 8)).all()
    assert (boxes.sum(dim=(1, 2)) == rows * cols).all() and (rows == 8).any() and (rows < 8).any()


def test_label_aided_cutmix_follows_the_released_order():
    def maps(base):
        return {"image": torch.full((3, 1, 2, 2), float(base)) + torch.arange(3).view(3, 1, 1, 1),
                "target": torch.full((3, 2, 2), base) + torch.arange(3).view(3, 1, 1)}
    u, lab = maps(0), maps(10)
    perm = torch.tensor([2, 0, 1])
    box_l = torch.zeros(3, 2, 2, dtype=torch.bool)
    box_l[:, 0, 0] = True
    box_u = torch.zeros(3, 2, 2, dtype=torch.bool)
    box_u[:, 0, :] = True
    take = torch.tensor([True, False, True])
    out = label_aided_cutmix(u, lab, take, perm, box_l, box_u)
    # step 1: u0 gets labelled 2 at (0,0) -> [[12, 0], [0, 0]]; u2 gets labelled 1 -> [[11, 2], [2, 2]];
    # step 2: row 0 of image i comes from the step-1 image perm[i] (so u0's labelled pixel lands in image 1)
    assert out["target"].tolist() == [[[11, 2], [0, 0]], [[12, 0], [1, 1]], [[1, 1], [2, 2]]]
    assert torch.equal(out["image"][:, 0], out["target"].float())


def test_adaptive_mixing_probability_is_one_minus_reliability(monkeypatch, stub_segmenter, stub_config):
    """A fully reliable unlabelled image never receives labelled pixels; an unreliable one always does."""
    fw = AugSeg(stub_config("augseg.extra_weak=false", "augseg.threshold=0"), stub_segmenter(scale=5),
                FrameworkContext(3))
    calls = []
    import hafis.frameworks.augseg as mod
    real = mod.label_aided_cutmix

    def spy(u, lab, take, perm, box_l, box_u):
        calls.append(take.clone())
        return real(u, lab, take, perm, box_l, box_u)

    monkeypatch.setattr(mod, "label_aided_cutmix", spy)
    monkeypatch.setattr(mod, "image_reliability", lambda prob: torch.tensor([1.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    labelled = {"image": torch.randn(2, 3, 8, 8, generator=g), "mask": torch.randint(0, 3, (2, 8, 8), generator=g)}
    unlabelled = {"weak": torch.stack([normalize(torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8))
                                       for _ in range(2)]), "ignore": torch.zeros(2, 8, 8, dtype=torch.long)}
    for it in range(5):
        out = fw.train_step(labelled, unlabelled, it)
        assert math.isfinite(out.loss.item())
    assert [c.tolist() for c in calls] == [[False, True]] * 5


def test_weight_normaliser_leaves_out_ignored_pixels(monkeypatch, stub_segmenter, stub_config):
    config = stub_config("augseg.extra_weak=false", "augseg.threshold=0", "augseg.cutmix=false",
                         "weighting.enabled=true", "weighting.normalize=weight")
    fw = AugSeg(config, stub_segmenter(scale=5), FrameworkContext(3))
    g = torch.Generator().manual_seed(3)
    w = torch.randint(1, 5, (2, 8, 8), generator=g).float() / 4
    monkeypatch.setattr(fw.weighting, "weights", lambda features, pseudo, confidence=None: w)
    seen = []
    real_forward = fw.model.forward
    monkeypatch.setattr(fw.model, "forward", lambda x, feature_perturbation=False: seen.append(
        real_forward(x)) or seen[-1])
    labelled = {"image": torch.randn(2, 3, 8, 8, generator=g), "mask": torch.randint(0, 3, (2, 8, 8), generator=g)}
    ignore = torch.zeros(2, 8, 8, dtype=torch.long)
    ignore[:, 5:, :] = 255  # padding: three rows of each image
    unlabelled = {"weak": torch.stack([normalize(torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8))
                                       for _ in range(2)]), "ignore": ignore}
    out = fw.train_step(labelled, unlabelled, 0)
    pred_s = seen[-1].logits[-2:].detach()
    pseudo = fw.teacher(unlabelled["weak"]).logits.argmax(dim=1)
    valid = (ignore != 255).float()
    ce = F.cross_entropy(pred_s, pseudo, reduction="none")
    expected = (w * valid * ce).sum() / (w * valid).sum()
    assert out.terms["loss_u"].item() == pytest.approx(expected.item(), rel=1e-6)
