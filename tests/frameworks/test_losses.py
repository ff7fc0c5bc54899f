"""OHEM cross-entropy against hand-computed pixel selections."""

import math

import torch
import torch.nn.functional as F

from hafis.config import load_config
from hafis.frameworks.losses import ohem_cross_entropy, ohem_keep, supervised_loss


def _logits_for(probs_true):
    """Two-class logits whose class-0 probability is each given value."""
    p = torch.tensor(probs_true, dtype=torch.float64)
    return torch.stack([torch.log(p), torch.log(1 - p)]).unsqueeze(0).unsqueeze(2)  # (1, 2, 1, N)


def test_ohem_keeps_easy_pixels_out_and_at_least_min_kept():
    logits = _logits_for([0.1, 0.5, 0.8, 0.9, 0.99, 0.3])
    target = torch.tensor([[[0, 0, 0, 0, 0, 255]]])
    # threshold 0.7: pixels with p <= 0.7 (0.1, 0.5); the ignored one never
    assert ohem_keep(logits, target, 0.7, 0).tolist() == [[[True, True, False, False, False, False]]]
    # at least 3 kept: the threshold rises to the 3rd smallest probability (0.8)
    assert ohem_keep(logits, target, 0.7, 3).tolist() == [[[True, True, True, False, False, False]]]
    # min_kept above the valid count: plain CE over every valid pixel, as released
    assert ohem_keep(logits, target, 0.7, 10).tolist() == [[[True, True, True, True, True, False]]]
    expected = -(math.log(0.1) + math.log(0.5) + math.log(0.8)) / 3
    assert math.isclose(float(ohem_cross_entropy(logits, target, 0.7, 3)), expected, rel_tol=1e-9)


def test_supervised_loss_follows_the_config():
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    ce = load_config(None, []).loss
    assert torch.equal(supervised_loss(logits, target, ce), F.cross_entropy(logits, target, ignore_index=255))
    ohem = load_config(None, ["loss.labelled=ohem", "loss.ohem_min_kept=3"]).loss
    keep = ohem_keep(logits, target, 0.7, 6)  # 3 per image x 2 images
    expected = F.cross_entropy(logits, target.masked_fill(~keep, 255), ignore_index=255)
    torch.testing.assert_close(supervised_loss(logits, target, ohem), expected)
