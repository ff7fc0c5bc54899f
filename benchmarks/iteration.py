"""One training iteration of the realistic benchmark (``configs/realistic/base.yaml``), before vs after the speed work.

    python benchmarks/iteration.py                       # UniMatch, 1 thread: every variant against `before`
    python benchmarks/iteration.py --framework supervised --rounds 5

Every variant is its own trainer (model, optimiser, data streams) in this one process; the variants take turns in
blocks of ``--block`` iterations for ``--rounds`` rounds, so a change of the machine's load hits all of them alike.
Each iteration is timed twice: wall time, and the process's CPU time (``time.process_time``), which on a machine
shared with other jobs counts only this process's own work (with one thread, waiting for a core is not counted).
An iteration is what the trainer's loop runs: the next labelled and unlabelled batches (augmentation included), the
framework's step under the run's autocast, backward and the optimiser step. Per variant: the median iteration of
each block; the ratio to ``before`` is taken per round (both from the same round) and its median over the rounds
reported (range beside it), with the load average at the start of every round.

Variants (overrides on the config as committed):
- ``before``: the network as first benchmarked (decoder width 128, float32, PyTorch's own convolution kernels);
- ``exact``: ``train.fast_convs`` (all-padding taps cut off, depthwise backward as convolutions), float32;
- ``exact+bf16``: and bf16 autocast;
- ``after``: the committed config (exact, bf16 autocast, decoder width 64);
- ``after+w32`` (not run by default): the same with decoder width 32;
- ``after+compile`` (not run by default): the committed config with ``train.compile`` (the warm-up iterations
  compile: minutes on a CPU, seconds from a warm inductor cache), the fast paths compiled in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import footer, header, load, table

from hafis.config import load_config
from hafis.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "realistic" / "base.yaml"
BEFORE = ["train.fast_convs=false", "train.amp='off'", "model.feature_dim=128", "model.aspp_channels=128"]
VARIANTS = {
    "before": BEFORE,
    "exact": [*BEFORE, "train.fast_convs=true"],
    "exact+bf16": [*BEFORE, "train.fast_convs=true", "train.amp=bf16"],
    "after": [],
    "after+w32": ["model.feature_dim=32", "model.aspp_channels=32"],
    "after+compile": ["train.compile=true"],
}
DEFAULT = ["before", "exact", "exact+bf16", "after"]


class Iteration:
    """A trainer of one variant, stepped exactly like :meth:`hafis.engine.trainer.Trainer.train`'s loop body."""

    def __init__(self, overrides: list[str], framework: str, out: Path):
        config = load_config(CONFIG, [f"train.framework={framework}", f"output_dir={out}", *overrides])
        self.trainer = Trainer(config)
        self.labelled, self.unlabelled = self.trainer._streams()
        self.trainer.model.train()
        self.iteration = 0

    def __call__(self) -> None:
        t = self.trainer
        batch_l = next(self.labelled)
        batch_u = next(self.unlabelled) if self.unlabelled else None
        with t._autocast():
            step = t.framework.train_step(batch_l, batch_u, self.iteration)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(step.loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.framework.after_optimizer_step(self.iteration)
        self.iteration += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", default="unimatch")
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=int, default=5, help="iterations per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "iteration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header(f"One {args.framework} iteration of configs/realistic, before vs after")
    print(f"- CPU native bf16 (AVX512-BF16): {getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: '?')()}; "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}\n")
    runs = {name: Iteration(VARIANTS[name], args.framework, args.out / name) for name in args.variants}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    blocks = {clock: {name: [] for name in runs} for clock in clocks}
    for r in range(args.rounds):
        start_load = load()
        for name, run in runs.items():
            times: dict[str, list[float]] = {clock: [] for clock in clocks}
            for _ in range(args.block):
                start = {clock: fn() for clock, fn in clocks.items()}
                run()
                for clock, fn in clocks.items():
                    times[clock].append(fn() - start[clock])
            for clock in clocks:
                blocks[clock][name].append(statistics.median(times[clock]))
        print(f"round {r + 1}: load {start_load}; " + ", ".join(
            f"{n} {blocks['wall'][n][-1]:.3f} s wall / {blocks['cpu'][n][-1]:.3f} s CPU" for n in runs), flush=True)
    base = "before" if "before" in runs else next(iter(runs))
    rows = []
    for name in runs:
        extra = VARIANTS[name]
        if name != "before" and extra[:len(BEFORE)] == BEFORE:
            extra = ["before +", *extra[len(BEFORE):]]
        row = [name, " ".join(extra) or "(the committed config)"]
        for clock in ("cpu", "wall"):
            ratios = [a / b for a, b in zip(blocks[clock][name], blocks[clock][base], strict=True)]
            row += [statistics.median(blocks[clock][name]), statistics.median(ratios),
                    f"{min(ratios):.2f}-{max(ratios):.2f}"]
        rows.append(row)
    print()
    table(["variant", "overrides", "CPU s / it", f"CPU ratio to {base}", "range", "wall s / it",
           f"wall ratio to {base}", "range"], rows)
    footer()


if __name__ == "__main__":
    sys.exit(main())
