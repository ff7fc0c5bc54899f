"""OHEM cross-entropy against hand-computed pixel selections."""

import math

import torch

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
    # two images of two pixels; class-0 probabilities 0.9, 0.6 and 0.8, 0.95, every pixel labelled 0
    logits = torch.cat([_logits_for([0.9, 0.6]), _logits_for([0.8, 0.95])])
    target = torch.zeros(2, 1, 2, dtype=torch.long)
    ce = -(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.95)) / 4
    assert math.isclose(float(supervised_loss(logits, target, load_config(None, []).loss)), ce, rel_tol=1e-9)
    assert math.isclose(float(supervised_loss(logits, target)), ce, rel_tol=1e-9)
    # threshold 0.7 keeps only 0.6; min_kept 1 per image (2 for the batch) raises the cut to 0.8
    ohem = load_config(None, ["loss.labelled=ohem", "loss.ohem_min_kept=1"]).loss
    expected = -(math.log(0.6) + math.log(0.8)) / 2
    assert math.isclose(float(supervised_loss(logits, target, ohem)), expected, rel_tol=1e-9)
