"""Two gloo processes on CPU against one process with the same global batch.

They cannot be bit-identical, for documented reasons (hafis.engine.distributed): BatchNorm statistics are per rank
(SyncBatchNorm needs GPUs), each rank normalises its loss by its own pixel count before gradients are averaged,
UniMatch's CutMix partners are drawn inside each rank's share of the batch, and the prototype bank subsamples each
rank's pixels before the all-gather. What must hold: the run finishes, only rank 0 writes, every rank ends with the
same weights and prototype bank (checked by the trainer at each checkpoint), and the result is close to the one-process run.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from hafis.config import load_config
from hafis.engine.checkpoint import load_checkpoint
from hafis.engine.run_log import read_metrics
from hafis.engine.trainer import build_model

TINY = Path(__file__).parents[2] / "configs" / "tiny" / "unimatch.yaml"
ARGS = ["train.batch_size=4", "train.unlabelled_batch_size=4", "train.iterations=4", "train.eval_interval=2",
        "weighting.enabled=true", "weighting.reliable=confidence", "weighting.labelled_threshold=0"]


def run(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hafis", "train", str(TINY), *ARGS, f"output_dir={run_dir}", *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def flat(state):
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


def test_two_processes_match_one_process_as_documented(tmp_path):
    out = run(tmp_path / "two", "--nproc", "2")
    assert out.count('"run_dir"') == 1  # only rank 0 reports
    run(tmp_path / "one")
    records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]  # written once, by rank 0
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "ckpt_00000004.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt_00000004.pt")
    torch.manual_seed(0)
    start = build_model(load_config(TINY, ARGS), 4).state_dict()
    w0, w1, w2 = flat(start), flat(one["student"]), flat(two["student"])
    travelled = (w1 - w0).norm()
    assert travelled > 0
    assert (w2 - w1).norm() < 0.5 * travelled, float((w2 - w1).norm() / travelled)
    banks = [c["framework"]["weighting"]["bank.labelled.count"] for c in (one, two)]
    # each rank pushes up to samples_per_class pixels per class; gathered, the two ranks together push more
    assert banks[1].sum() > banks[0].sum() > 0
