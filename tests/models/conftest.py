"""What the model tests share: the released ResNets' state-dict keys."""

import pytest


def _official_resnet_keys(blocks):
    """The deep-stem ResNet's state-dict keys as UniMatch / U2PL / AEL / AugSeg name them (model/backbone/resnet.py):
    a three-conv stem ``conv1.{0,3,6}`` with BN ``conv1.{1,4}``, ``bn1``, bottleneck layers, ``fc``."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.0.weight", "conv1.3.weight", "conv1.6.weight"]
    keys += [f"{m}.{p}" for m in ("conv1.1", "conv1.4", "bn1") for p in bn]
    for layer, n in enumerate(blocks, 1):
        for j in range(n):
            pre = f"layer{layer}.{j}"
            keys += [f"{pre}.conv{i}.weight" for i in (1, 2, 3)] + [f"{pre}.bn{i}.{p}" for i in (1, 2, 3) for p in bn]
            if j == 0:
                keys += [f"{pre}.downsample.0.weight"] + [f"{pre}.downsample.1.{p}" for p in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture
def official_resnet_keys():
    """``official_resnet_keys(blocks)``: a released deep-stem ResNet's keys, classifier (``fc``) last."""
    return _official_resnet_keys
