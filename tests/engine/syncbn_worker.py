"""Run by test_sync_bn.py as ``torchrun --nproc_per_node 2 syncbn_worker.py OUT TINY_CONFIG`` (gloo, CPU): each rank
saves what it saw to ``OUT/rank{r}.pt``; the test compares it with one process holding the global batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hafis.config import load_config
from hafis.engine import distributed
from hafis.engine.trainer import Trainer


def bn_net() -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return net


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images (rank r holds images 2r, 2r + 1) and the weights of a weighted-sum loss on the output."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(4, 3, 5, 6, generator=g) * 3 + 1, torch.randn(4, 2, 5, 6, generator=g)


def sync_bn_step(rank: int) -> dict:
    net = distributed.convert_sync_batchnorm(bn_net(), torch.device("cpu")).train()
    x, w = global_batch()
    x = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    out = net(x)
    (out * w[2 * rank:2 * rank + 2]).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for g in grads:  # the gradient of the sum of both ranks' losses
        dist.all_reduce(g)
    return {"out": out.detach(), "x_grad": x.grad, "param_grads": grads,
            "buffers": [b.clone() for b in net.buffers()]}


def trainer_networks(config_path: Path, out: Path) -> dict:
    """A U2PL run under torchrun with train.sync_bn: which normalisation layers its networks hold, and one step."""
    config = load_config(config_path, ["train.framework=u2pl", "u2pl.sup_only_iterations=0", "train.sync_bn=true",
                                       "train.batch_size=4", "train.unlabelled_batch_size=4", f"output_dir={out}"])
    trainer = Trainer(config)
    fw = trainer.framework
    kinds = {name: sorted({type(m).__name__ for m in distributed.unwrap(getattr(fw, name)).modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)}) for name in fw.traits.networks}
    labelled, unlabelled = trainer._streams()
    step = fw.train_step(next(labelled), next(unlabelled), 0)
    trainer.optimizer.zero_grad(set_to_none=True)
    step.loss.backward()
    trainer.optimizer.step()
    fw.after_optimizer_step(0)
    return {"kinds": kinds, "rep_head": type(fw.rep_head.net[1]).__name__, "loss": step.loss.detach(),
            "state": {k: v.clone() for k, v in distributed.unwrap(fw.model).state_dict().items()}}


def main(out: Path, config_path: Path) -> None:
    context = distributed.setup("cpu")
    results = {"sync_bn": sync_bn_step(context.rank), "trainer": trainer_networks(config_path, out)}
    torch.save(results, out / f"rank{context.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
