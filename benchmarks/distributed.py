"""Data-parallel UniMatch steps: torch's DistributedDataParallel against the hand-written averaging it replaced.

    python benchmarks/distributed.py --preset tiny --steps 5        # 2 gloo processes on CPU (relaunches torchrun)
    python benchmarks/distributed.py --preset r50 --steps 3         # DeepLabV3+ ResNet-50, 321 crop, global batch 2+2
    python benchmarks/distributed.py --preset r101 --device cuda --scaling   # NCCL: 1 GPU vs all GPUs

One torchrun run holds one model, one optimiser and two copies of the UniMatch framework over that model: one whose
network calls go through ``DistributedDataParallel`` (hafis's path: gradients all-reduced in buckets while the
backward pass runs, buffers broadcast before each forward), one calling the bare network and then averaging the
gradients after ``backward`` and broadcasting BatchNorm buffers after the step (the hand-written path). Steps
alternate between the two (DDP / hand, then hand / DDP, ...) on the same preloaded per-rank batch, every step
starts at a barrier, and a step's time is the slowest rank's. Reported: median seconds per step of each path,
their ratio, and the 1-minute load average when each figure was taken (a shared machine's load moves the numbers).

``--scaling`` (GPU): the DDP step with the same per-GPU batch on 1 GPU and on all GPUs; scaling efficiency
``t(1) / t(N)`` (1 = perfect weak scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import footer, header, load, median, sync, table
from _reference import hand_average_gradients, hand_broadcast_buffers
from step import PRESETS, make_batch

from hafis.config import load_config
from hafis.engine import distributed
from hafis.engine.build import build_model
from hafis.frameworks import FrameworkContext, build_framework


def make_config(preset: str, device: str, world: int):
    path, overrides, _ = PRESETS[preset]
    cfg = load_config(path, list(overrides) + ["weighting.enabled=false", "model.pretrained=null",
                                               "model.pretrained_path=null", f"train.device={device}"])
    # make_batch reads the batch sizes: each rank's share of the global batch
    cfg.train.batch_size //= world
    cfg.train.unlabelled_batch_size //= world
    return cfg


def slowest(seconds: float, device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(args) -> None:
    ctx = distributed.setup(args.device)
    device = torch.device(args.device, ctx.local_rank) if args.device == "cuda" else torch.device("cpu")
    cfg = make_config(args.preset, args.device, ctx.world_size)
    classes = PRESETS[args.preset][2]
    torch.manual_seed(0)
    model = build_model(cfg, classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    fw_ctx = FrameworkContext(classes)
    via_ddp, hand = build_framework(cfg, model, fw_ctx).to(device), build_framework(cfg, model, fw_ctx).to(device)
    distributed.wrap(via_ddp, via_ddp.traits.networks, device, via_ddp.traits.static_graph)
    labelled, unlabelled = make_batch(cfg, classes, device, seed=ctx.rank)
    params = list(model.parameters())

    def step(framework, it: int) -> float:
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        out = framework.train_step(labelled, unlabelled, it)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if framework is hand:
            hand_average_gradients(params, ctx.world_size)
        optimizer.step()
        if framework is hand:
            hand_broadcast_buffers(model)
        sync(device)
        return slowest(time.perf_counter() - start, device)

    paths = {"DDP": via_ddp} if args.ddp_only else {"DDP": via_ddp, "hand-written": hand}
    times = {name: [] for name in paths}
    loads = {name: [] for name in paths}
    for it in range(args.steps + 1):  # the first step of each path is a warm-up
        order = list(paths) if it % 2 == 0 else list(reversed(paths))
        for name in order:
            seconds = step(paths[name], it)
            if it > 0:
                times[name].append(seconds)
                loads[name].append(os.getloadavg()[0])
    if ctx.is_main:
        result = {name: {"seconds": median(times[name]), "load": median(loads[name])} for name in paths}
        result["world_size"] = ctx.world_size
        Path(args.result).write_text(json.dumps(result))
    distributed.teardown()


def launch(args, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve()), "--worker", "--result", str(result), "--preset", args.preset,
                   "--steps", str(args.steps), "--device", args.device] + (["--ddp-only"] if args.scaling else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).parent)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP / hand-written comparison")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--scaling", action="store_true", help="GPU: DDP on 1 GPU vs all GPUs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    header(f"distributed step, preset {args.preset}, {args.device}")
    if args.scaling:
        gpus = torch.cuda.device_count()
        one, every = launch(args, 1), launch(args, gpus)
        t1, tn = one["DDP"]["seconds"], every["DDP"]["seconds"]
        table(["GPUs", "s / step", "load (1 min)", "efficiency t(1) / t(N)"],
              [[1, f"{t1:.4f}", f"{one['DDP']['load']:.2f}", "1"],
               [gpus, f"{tn:.4f}", f"{every['DDP']['load']:.2f}", f"{t1 / tn:.3f}"]])
    else:
        r = launch(args, args.nproc)
        ddp, hand = r["DDP"], r["hand-written"]
        table(["path", "processes", "s / step (median)", "load (1 min)"],
              [["DDP", r["world_size"], f"{ddp['seconds']:.4f}", f"{ddp['load']:.2f}"],
               ["hand-written", r["world_size"], f"{hand['seconds']:.4f}", f"{hand['load']:.2f}"]])
        print(f"\nDDP / hand-written: {ddp['seconds'] / hand['seconds']:.3f} (load now {load()})")
    footer()


if __name__ == "__main__":
    main()
