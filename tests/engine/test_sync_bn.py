"""``train.sync_bn`` under torchrun (two gloo processes on CPU): every BatchNorm of the trained networks becomes a
SyncBatchNorm, and its statistics, outputs and gradients are those of one process holding the global batch."""

import sys
from pathlib import Path

import pytest
import torch

from hafis.engine import distributed

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_config, two_ranks):
    return two_ranks(HERE / "syncbn_worker.py", tmp_path_factory.mktemp("syncbn"), tiny_config)


def test_trainer_converts_every_trained_network(ranks):
    for r in ranks:
        t = r["trainer"]
        assert t["kinds"] == {"model": ["CpuSyncBatchNorm"], "student": ["CpuSyncBatchNorm"]}
        assert t["rep_head"] == "CpuSyncBatchNorm"  # U2PL's framework-owned head too
    a, b = ranks[0]["trainer"], ranks[1]["trainer"]
    assert not torch.equal(a["loss"], b["loss"])  # each rank its own share of the batch ...
    for k in a["state"]:  # ... one model: synchronised statistics and averaged gradients
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=0, atol=1e-6, msg=k)


def test_cpu_sync_bn_equals_batchnorm_on_the_global_batch(ranks):
    sys.path.insert(0, str(HERE))
    from syncbn_worker import bn_net, global_batch

    net = bn_net().train()
    x, w = global_batch()
    x.requires_grad_(True)
    out = net(x)
    (out * w).sum().backward()
    for rank, r in enumerate(ranks):
        s = r["sync_bn"]
        part = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(s["out"], out[part].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(s["x_grad"], x.grad[part], rtol=0, atol=1e-5)
        for got, p in zip(s["param_grads"], net.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-4)
        # running mean / unbiased variance of the global batch
        for got, b in zip(s["buffers"], net.buffers(), strict=True):
            torch.testing.assert_close(got, b, rtol=0, atol=1e-6)


def test_conversion_by_device_and_one_process_keeps_batchnorm():
    net = distributed.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cuda"))
    assert type(net[0]) is torch.nn.SyncBatchNorm  # torch's own on GPUs
    net = distributed.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    assert type(net[0]) is distributed.CpuSyncBatchNorm
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(net(x), torch.nn.functional.batch_norm(x, None, None, net[0].weight, net[0].bias, True))
