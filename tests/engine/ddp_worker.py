"""Run by test_distributed.py as ``torchrun --nproc_per_node 2 ddp_worker.py OUT TINY_CONFIG`` (gloo): each rank saves
what it saw to ``OUT/rank{r}.pt`` and the test compares the ranks, and the ranks with one process."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from hafis.config import load_config
from hafis.engine import distributed
from hafis.engine.trainer import Trainer
from hafis.weighting import PrototypeBank


def bank_pushes(rank: int) -> dict:
    """Two images per rank, class 0 on the left half, class 1 on the right; a pixel's feature is
    ``(rank, class, global pixel id)``, so the test can tell where every stored vector came from."""
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[..., 2:] = 1
    ids = torch.arange(rank * 32, (rank + 1) * 32, dtype=torch.float).view(2, 1, 4, 4)
    features = torch.cat([torch.full_like(ids, float(rank)), labels[:, None].float(), ids], dim=1)
    out = {}
    for n in (5, 1):
        bank = PrototypeBank(2, 3, memory_per_class=16, samples_per_class=n, seed=7)
        bank.push_labelled(features, labels)
        out[n] = {"count": bank.labelled.count.clone(), "contents": [bank.labelled.contents(c) for c in (0, 1)],
                  "seed": bank._generator(torch.device("cpu")).initial_seed()}
    return out


def toy_network() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def toy_batch(step: int) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(100 + step))


def toy_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Two forward passes before one backward, with a no-grad eval-mode forward between them (UniMatch's shape)."""
    loss = model(x).square().mean()
    with torch.no_grad():
        model.eval()
        model(x.flip(-2))
        model.train()
    return loss + model(x.flip(-1)).mean()


def toy_ddp(rank: int, world: int) -> list:
    owner = SimpleNamespace(model=toy_network())
    distributed.wrap(owner, ("model",), torch.device("cpu"), static_graph=True)
    optimizer = torch.optim.SGD(owner.model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        toy_loss(owner.model, toy_batch(step)[rank::world]).backward()
        optimizer.step()
    return [p.detach().clone() for p in owner.model.parameters()]


def u2pl_gradients(config_path: Path, out: Path) -> dict:
    """U2PL under DDP: step 0 is supervised-only (the representation head unused), step 1 the full recipe."""
    config = load_config(config_path, ["train.framework=u2pl", "u2pl.sup_only_iterations=1", "train.batch_size=4",
                                       "train.unlabelled_batch_size=4", f"output_dir={out}"])
    trainer = Trainer(config)
    framework = trainer.framework
    labelled, unlabelled = trainer._streams()
    seen = {}
    for it in range(2):
        step = framework.train_step(next(labelled), next(unlabelled), it)
        trainer.optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        seen[it] = {"head": [None if p.grad is None else p.grad.clone() for p in framework.rep_head.parameters()],
                    "teacher": [p.grad for p in framework.teacher.module.parameters()],
                    "teacher_requires_grad": any(p.requires_grad for p in framework.teacher.module.parameters())}
        trainer.optimizer.step()
        framework.after_optimizer_step(it)
    return seen


def main(out: Path, config_path: Path) -> None:
    context = distributed.setup("cpu")
    results = {"bank": bank_pushes(context.rank), "toy": toy_ddp(context.rank, context.world_size),
               "u2pl": u2pl_gradients(config_path, out)}
    torch.save(results, out / f"rank{context.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
