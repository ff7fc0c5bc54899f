"""Two gloo processes on CPU (DistributedDataParallel) against one process with the same global batch.

Exact where the recipe allows it: a BatchNorm-free network with a mean loss over equal per-rank shares takes the
same SGD steps on 2 processes as on 1 (DDP averages the per-rank gradients; only the summation order differs, so
1e-6). The tiny UniMatch run cannot be: BatchNorm statistics are per rank (train.sync_bn is off), each rank's
loss is normalised by its own pixel count, UniMatch's CutMix partners come from each rank's share, and the bank
subsamples each rank's pixels; there the two runs must stay within a stated distance of each other.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hafis.config import load_config
from hafis.engine.build import build_model
from hafis.engine.checkpoint import load_checkpoint
from hafis.engine.run_log import read_metrics

HERE = Path(__file__).parent
# train.amp=off: the subprocesses resolve the tiny config's auto on this machine's CPU (conftest pins it in-process)
ARGS = ["train.batch_size=4", "train.unlabelled_batch_size=4", "train.iterations=4", "train.eval_interval=2",
        "weighting.enabled=true", "weighting.reliable=confidence", "weighting.labelled_threshold=0", "train.amp=off"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(config, *args):
    proc = subprocess.run([sys.executable, "-m", "hafis", "train", str(config), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def flat(state):
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_config, two_ranks):
    """What each of two torchrun ranks saw in ddp_worker.py."""
    return two_ranks(HERE / "ddp_worker.py", tmp_path_factory.mktemp("ddp"), tiny_config)


def test_ddp_steps_equal_one_process_on_the_global_batch(ranks):
    sys.path.insert(0, str(HERE))
    from ddp_worker import toy_batch, toy_loss, toy_network

    model = toy_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):  # one process, the whole global batch, plain autograd
        optimizer.zero_grad()
        toy_loss(model, toy_batch(step)).backward()
        optimizer.step()
    start = toy_network()
    for p, p0, a, b in zip(model.parameters(), start.parameters(), ranks[0]["toy"], ranks[1]["toy"], strict=True):
        assert not torch.equal(p, p0)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-6)


def test_bank_quota_is_global_and_ranks_hold_one_bank(ranks):
    for n, quotas in ((5, (3, 2)), (1, (1, 0))):
        a, b = ranks[0]["bank"][n], ranks[1]["bank"][n]
        # one process with the global batch (32 pixels per class) would push min(n, 32) vectors per class
        assert a["count"].tolist() == b["count"].tolist() == [n, n]
        for cls in (0, 1):
            stored = a["contents"][cls]
            assert torch.equal(stored, b["contents"][cls])
            assert (stored[:, 1] == cls).all()  # every vector is a pixel of its own class
            assert stored[:, 2].unique().numel() == n  # distinct pixels
            assert stored[:, 0].tolist() == [0.0] * quotas[0] + [1.0] * quotas[1]  # rank 0's share, then rank 1's
    assert (ranks[0]["bank"][5]["seed"], ranks[1]["bank"][5]["seed"]) == (7, 8)  # seed + rank


def test_framework_head_gets_gradients_teacher_does_not(ranks):
    a, b = ranks[0]["u2pl"], ranks[1]["u2pl"]
    assert all(g is None for g in a[0]["head"])  # supervised-only step: the head is unused, and DDP allows it
    for ga, gb in zip(a[1]["head"], b[1]["head"], strict=True):
        assert ga is not None and ga.abs().sum() > 0
        assert torch.equal(ga, gb)  # averaged across the ranks, whose batches differ
    for rank in (a, b):
        for step in rank.values():
            assert all(g is None for g in step["teacher"]) and not step["teacher_requires_grad"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_config):
    """The tiny run on two gloo processes: ``(run dir, stdout)``; checkpoints at iterations 2 and 4."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    return run_dir, run(tiny_config, *ARGS, f"output_dir={run_dir}", "--nproc", "2")


def test_two_processes_stay_close_to_one_process(tmp_path, tiny_config, two_processes):
    two_dir, out = two_processes
    assert out.count('"run_dir"') == 1  # only rank 0 reports
    run(tiny_config, *ARGS, f"output_dir={tmp_path / 'one'}")
    records = read_metrics(two_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]  # written once, by rank 0
    two = load_checkpoint(two_dir / "checkpoints" / "ckpt_00000004.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt_00000004.pt")
    torch.manual_seed(0)
    start = build_model(load_config(tiny_config, ARGS), 4).state_dict()
    w0, w1, w2 = flat(start), flat(one["student"]), flat(two["student"])
    travelled = (w1 - w0).norm()
    assert travelled > 0
    # per-rank BatchNorm statistics, loss normalisers and CutMix partners (module docstring): a stated tolerance
    assert (w2 - w1).norm() < 0.5 * travelled, float((w2 - w1).norm() / travelled)
    counts = [c["framework"]["weighting"]["bank.labelled.count"] for c in (one, two)]
    # the quota is global: 4 steps push at most 4 x 8 vectors of a class on 1 or 2 processes (a per-rank quota would
    # reach 64 on two), and where qualifying pixels abound exactly that many; which classes qualify depends on the
    # per-rank BatchNorm statistics, so the two runs' counts differ class by class
    assert (counts[0] <= 4 * 8).all() and (counts[1] <= 4 * 8).all() and counts[1].max() == 4 * 8
    assert [len(two["bank_generators"]), one["bank_generators"]] == [2, None]  # each rank's own draws


def test_failed_rendezvous_is_one_line_and_exit_2(tmp_path, tiny_config):
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    proc = subprocess.run([sys.executable, "-m", "hafis", "train", str(tiny_config), f"output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("hafis train: error: rendezvous failed") and "MASTER_ADDR" in lines[-1]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_nnodes_without_endpoint_is_a_usage_error(capsys, tiny_config):
    from hafis.cli import main

    assert main(["train", str(tiny_config), "--nproc", "2", "--nnodes", "2"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_resume_from_a_path_through_torchrun(tmp_path, tiny_config, two_processes, assert_states_equal):
    """``hafis train CONFIG --nproc 2 --resume PATH`` (overrides after the options) continues the two-process run
    from its iteration-2 checkpoint into another folder and ends where the uninterrupted run did."""
    two_dir, _ = two_processes
    checkpoint = two_dir / "checkpoints" / "ckpt_00000002.pt"
    out = run(tiny_config, "--nproc", "2", "--resume", str(checkpoint), *ARGS, f"output_dir={tmp_path / 'resumed'}")
    assert f"resumed from {checkpoint} at iteration 2" in out
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [3, 4]
    a = load_checkpoint(two_dir / "checkpoints" / "ckpt_00000004.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_00000004.pt")
    for key in ("student", "model", "optimizer", "framework"):
        assert_states_equal(a[key], b[key], key)
