import pytest
import torch
from torch import nn

from hafis.config import load_config
from hafis.data.ssl import UnlabelledDataset
from hafis.data.synthetic import SyntheticConfig, SyntheticScenes
from hafis.data.transforms import GeometryDraw, apply_geometry
from hafis.frameworks.base import FrameworkContext, PseudoLabelWeighting
from hafis.frameworks.mixing import partner_index, paste
from hafis.frameworks.unimatch import UniMatch
from hafis.models import SegOutput
from hafis.weighting import box_mask_from_detections, confident_pixels, detector_reliable

T = True
F = False


def test_box_mask_from_detections_is_exact():
    boxes = torch.tensor([[1, 0, 3, 2], [3, 0, 5, 3], [0, 2, 2, 4], [0, 2, 1, 3], [0.4, 3.4, 1.4, 4.0],
                          [0, 0, 6, 4]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 2, 1, 0, 9])  # class 9 is outside the 4 classes: dropped
    scores = torch.tensor([0.97, 0.96, 0.5, 0.99, 0.95, 1.0])  # the third is below tau_det
    mask = box_mask_from_detections(boxes, labels, scores, 4, (4, 6), score_threshold=0.95)
    assert mask.dtype == torch.bool and mask.shape == (4, 4, 6)
    expected = torch.zeros(4, 4, 6, dtype=torch.bool)
    expected[1, 0:2, 1:3] = True
    expected[1, 2, 0] = True
    expected[2, 0:3, 3:5] = True
    expected[0, 3, 0] = True  # fractional box: pixel (3, 0) has its centre (0.5, 3.5) inside, (3, 1) does not
    assert torch.equal(mask, expected)
    assert not box_mask_from_detections(boxes, labels, scores, 4, (4, 6), score_threshold=1.01).any()
    empty = box_mask_from_detections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), 3, (2, 2))
    assert empty.shape == (3, 2, 2) and not empty.any()


def _hand_case():
    """4 classes: 0 background and 3 sky are stuff, 1 and 2 are things; one 4 x 6 image."""
    pseudo = torch.tensor([[0, 1, 1, 2, 2, 3],
                           [0, 1, 1, 2, 2, 3],
                           [1, 1, 0, 2, 2, 3],
                           [0, 0, 0, 0, 3, 3]])[None]
    conf = torch.full((1, 4, 6), 0.99)
    conf[0, 0, 2] = 0.5
    conf[0, 1, 4] = 0.9
    valid = torch.ones(1, 4, 6, dtype=torch.bool)
    valid[0, 3, 5] = False  # padding
    boxes = torch.tensor([[1, 0, 3, 2], [3, 0, 5, 3], [0, 2, 2, 4], [0, 2, 1, 3]], dtype=torch.float32)
    labels, scores = torch.tensor([1, 2, 2, 1]), torch.tensor([0.97, 0.96, 0.5, 0.99])
    box_mask = box_mask_from_detections(boxes, labels, scores, 4, (4, 6))[None]
    return conf, pseudo, valid, box_mask


def test_detector_rule_on_a_hand_made_prediction():
    conf, pseudo, valid, box_mask = _hand_case()
    got = detector_reliable(conf, pseudo, valid, box_mask, thing_classes=(1, 2))
    assert got[0].tolist() == [[F, T, F, T, T, F],
                               [F, T, T, T, F, F],
                               [T, F, F, T, T, F],   # (2, 1) is class 1 but no class-1 box covers it
                               [F, F, F, F, F, F]]
    # stuff: confidence: background / sky pixels are judged by confidence alone (not the padding pixel)
    got = detector_reliable(conf, pseudo, valid, box_mask, thing_classes=(1, 2), stuff="confidence")
    assert got[0].tolist() == [[T, T, F, T, T, T],
                               [T, T, T, T, F, T],
                               [T, F, T, T, T, T],
                               [T, T, T, T, T, F]]
    # every detector-reliable pixel is confidence-reliable, never the other way round
    conf_only = confident_pixels(conf, pseudo) & valid
    assert bool((got <= conf_only).all()) and int(conf_only.sum()) > int(
        detector_reliable(conf, pseudo, valid, box_mask, (1, 2)).sum())
    # a class-2 box over a class-1 pixel does not make it reliable: the box must be of the pseudo-label's class
    wrong_class = torch.zeros_like(box_mask)
    wrong_class[:, 2] = True
    assert not detector_reliable(conf, pseudo, valid, wrong_class, (1, 2))[pseudo == 1].any()
    with pytest.raises(ValueError, match="stuff"):
        detector_reliable(conf, pseudo, valid, box_mask, (1, 2), stuff="keep")


def test_box_mask_follows_a_forced_flip_and_a_rescaled_crop():
    h, w = 8, 10
    boxes = torch.tensor([[1, 2, 4, 7], [6, 0, 10, 3]], dtype=torch.float32)
    labels, scores = torch.tensor([1, 2]), torch.tensor([0.99, 0.98])
    mask = box_mask_from_detections(boxes, labels, scores, 3, (h, w)).to(torch.uint8)
    image = torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w).remainder(256).to(torch.uint8)

    # flip only: the mask equals the box mask of the mirrored boxes, and the image is mirrored the same way
    out_image, (out_mask,) = apply_geometry(image, [(mask, 0)], GeometryDraw((h, w), (0, 1), True), crop_size=8)
    mirrored = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1) - torch.tensor(
        [w - 1 - 8, 0, w - 1 - 8, 0])  # crop x0 = 1 of the unflipped image is x0 = w - 1 - 8 after the flip
    assert torch.equal(out_image, image[:, :, 1:9].flip(-1))
    assert torch.equal(out_mask.bool(), box_mask_from_detections(mirrored, labels, scores, 3, (8, 8)))

    # scale x2, crop at (y, x) = (3, 5), flip: boxes x2, shifted, mirrored inside the crop
    _, (out_mask,) = apply_geometry(image, [(mask, 0)], GeometryDraw((2 * h, 2 * w), (3, 5), True), crop_size=12)
    b = boxes * 2 - torch.tensor([5, 3, 5, 3])
    b = torch.stack([12 - b[:, 2], b[:, 1], 12 - b[:, 0], b[:, 3]], dim=1)
    assert torch.equal(out_mask.bool(), box_mask_from_detections(b, labels, scores, 3, (12, 12)))
    assert out_mask.any() and not out_mask.all()


def test_unlabelled_stream_carries_an_aligned_box_mask():
    """Boxes = the ground-truth instance boxes: after resize / pad / crop / flip, every ground-truth pixel of a
    class must still lie inside that class's box mask, and the padding must have no box. The ground truth goes
    through the same geometry as a second per-class mask (nearest, padding 0): the batch carries none."""
    source = SyntheticScenes(SyntheticConfig(image_size=32, num_labelled=1, num_unlabelled=6, num_val=1,
                                             num_object_classes=3), "unlabelled", cache_dir=False)

    def provider(index, size):
        s = source.load(index)
        assert tuple(size) == s.image.shape[:2]
        return box_mask_from_detections(torch.from_numpy(s.boxes), torch.from_numpy(s.box_labels),
                                        torch.ones(len(s.boxes)), 4, size).to(torch.uint8)

    def ground_truth(index, size):
        mask = torch.from_numpy(source.load(index).mask).long()
        return torch.stack([mask == c for c in range(4)]).to(torch.uint8)

    plain = UnlabelledDataset(source, 24, (0.5, 1.5), seed=3)
    with_boxes = UnlabelledDataset(source, 24, (0.5, 1.5), seed=3, box_masks=provider)
    with_truth = UnlabelledDataset(source, 24, (0.5, 1.5), seed=3, box_masks=ground_truth)
    flips = objects = 0
    for index in range(len(source)):
        a, b = plain[(0, index)], with_boxes[(0, index)]
        assert "box_mask" not in a and "gt" not in a and "gt" not in b
        for key in ("weak", "strong1", "strong2", "ignore", "box1", "box2"):
            assert torch.equal(a[key], b[key]), key  # the box mask draws no random numbers
        box_mask, gt = b["box_mask"], with_truth[(0, index)]["box_mask"]
        assert box_mask.dtype == torch.bool and box_mask.shape == (4, 24, 24)
        assert not gt[:, b["ignore"] == 255].any() and bool((gt.sum(dim=0) <= 1).all())
        objects += int(gt[1:].sum())
        for c in (1, 2, 3):
            assert bool(box_mask[c][gt[c]].all())
        assert not box_mask[:, b["ignore"] == 255].any()
        assert box_mask[1:].any(dim=0).sum() < 24 * 24  # not trivially all ones
        flips += int(not torch.equal(box_mask, box_mask.flip(-1)))
    assert flips > 0 and objects > 0


def test_cutmix_moves_the_box_mask_with_the_pseudo_labels():
    conf, pseudo, valid, box_mask = _hand_case()
    # image 1: the same prediction, but its detector found class 1 everywhere and class 2 nowhere
    conf, pseudo, valid = (torch.cat([t, t]) for t in (conf, pseudo, valid))
    other = torch.zeros_like(box_mask)
    other[:, 1] = True
    box_mask = torch.cat([box_mask, other])
    box = torch.zeros(2, 4, 6, dtype=torch.bool)
    box[0, 1:3, 0:3] = True   # image 0 takes these pixels from image 1
    box[1, 0:2, 3:6] = True   # image 1 takes these from image 0
    partner = partner_index(2, torch.device("cpu"))
    mixed = [paste(t, t[partner], box) for t in (conf, pseudo, valid, box_mask)]
    got = detector_reliable(*mixed, thing_classes=(1, 2))
    per_image = detector_reliable(conf, pseudo, valid, box_mask, thing_classes=(1, 2))
    assert torch.equal(got, paste(per_image, per_image[partner], box))
    assert got[0, 2, 1]          # class 1 pixel at (2, 1): no box in image 0, but image 1's box mask covers it
    assert not per_image[0, 2, 1]
    assert got[1, 0, 3] and per_image[0, 0, 3]  # class 2 at (0, 3): image 1 takes it, with image 0's class-2 box
    assert not per_image[1, 0, 3]                # image 1's own detector has no class-2 box
    # a box mask left un-mixed would disagree
    wrong = detector_reliable(mixed[0], mixed[1], mixed[2], box_mask, thing_classes=(1, 2))
    assert not torch.equal(wrong, got)


def _weighting(**kw):
    overrides = [f"weighting.{k}={v}" for k, v in kw.items()]
    config = load_config(None, overrides).weighting
    return PseudoLabelWeighting(config, 4, 8, seed=0, thing_classes=(1, 2))


def test_framework_adapter_uses_the_configured_rule():
    conf, pseudo, valid, box_mask = _hand_case()
    ignore = torch.where(valid, 0, 255)
    on = _weighting(enabled="true")
    assert on.config.reliable == "detector"  # the paper's rule is the default
    assert torch.equal(on.reliable(conf, pseudo, ignore, box_mask),
                       detector_reliable(conf, pseudo, valid, box_mask, (1, 2)))
    with pytest.raises(ValueError, match="box_mask"):
        on.reliable(conf, pseudo, ignore)
    stuff = _weighting(enabled="true", stuff="confidence", tau_seg=0.9)
    assert torch.equal(stuff.reliable(conf, pseudo, ignore, box_mask),
                       detector_reliable(conf, pseudo, valid, box_mask, (1, 2), tau_seg=0.9, stuff="confidence"))
    ablation = _weighting(enabled="true", reliable="confidence")
    assert torch.equal(ablation.reliable(conf, pseudo, ignore, box_mask), confident_pixels(conf, pseudo) & valid)
    off = _weighting(enabled="false")  # method off, no detections: reports fall back to the confidence rule
    assert torch.equal(off.reliable(conf, pseudo, ignore), confident_pixels(conf, pseudo) & valid)


class _Stub(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 20)

    def forward(self, x, feature_perturbation=False):
        out = SegOutput(self.conv(x), x)
        if feature_perturbation:
            out.logits_fp = self.conv(x * 0.5)
        return out


@pytest.mark.parametrize("covered", [False, True])
def test_unimatch_feeds_the_bank_only_detector_verified_pixels(covered):
    config = load_config(None, ["model.feature_dim=3", "weighting.k=1", "weighting.enabled=true",
                                "weighting.tau_seg=0.0", "weighting.labelled_threshold=1.0", "unimatch.mix=in_batch"])
    fw = UniMatch(config, _Stub(), FrameworkContext(3, thing_classes=(0, 1, 2)))
    g = torch.Generator().manual_seed(1)
    n, s = 2, 4
    labelled = {"image": torch.randn(n, 3, s, s, generator=g), "mask": torch.randint(0, 3, (n, s, s), generator=g)}
    unlabelled = {k: torch.randn(n, 3, s, s, generator=g) for k in ("weak", "strong1", "strong2")}
    unlabelled.update(ignore=torch.zeros(n, s, s, dtype=torch.long), box1=torch.zeros(n, s, s, dtype=torch.bool),
                      box2=torch.zeros(n, s, s, dtype=torch.bool),
                      box_mask=torch.full((n, 3, s, s), covered, dtype=torch.bool))
    fw.train_step(labelled, unlabelled, 0)
    bank = fw.weighting.weighter.bank
    assert int(bank.labelled.count.sum()) == 0  # nothing labelled qualifies at threshold 1.0
    assert (int(bank.unlabelled.count.sum()) > 0) == covered
    del unlabelled["box_mask"]
    with pytest.raises(ValueError, match="box_mask"):
        fw.train_step(labelled, unlabelled, 1)
