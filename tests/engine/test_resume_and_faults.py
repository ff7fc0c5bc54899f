"""Kill-and-resume is bit-identical on CPU; faults give their documented errors and keep the checkpoints."""

import os
import re
import signal
import subprocess
import sys
import time

import torch

from hafis.cli import EXIT_NONFINITE, main
from hafis.engine.checkpoint import load_checkpoint
from hafis.engine.run_log import read_metrics
from hafis.frameworks.unimatch import UniMatch

# train.amp=off: the subprocess resolves the tiny config's auto on this machine's CPU (conftest pins it in-process)
ARGS = ["weighting.enabled=true", "weighting.reliable=confidence", "train.iterations=12", "train.eval_interval=4",
        "train.checkpoint_interval=2", "train.keep_checkpoints=3", "train.log_interval=1", "train.amp=off"]


def hafis(config, run_dir, *extra, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "hafis", "train", str(config), *ARGS, f"output_dir={run_dir}", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return out.decode()
    return proc


def comparable(records):
    return [{k: v for k, v in r.items() if k != "seconds_per_iteration"} for r in records]


def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_config, assert_states_equal):
    hafis(tiny_config, tmp_path / "straight")
    killed = hafis(tiny_config, tmp_path / "killed", wait=False)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "ckpt_00000004.pt").exists():
        assert killed.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (ckpts / "ckpt_00000012.pt").exists()
    out = hafis(tiny_config, tmp_path / "killed", "--resume")
    resumed_at = int(re.search(r"resumed from \S+ at iteration (\d+)", out).group(1))
    assert 4 <= resumed_at < 12  # evaluations at 8 and 12 are replayed

    final = "checkpoints/ckpt_00000012.pt"
    a = load_checkpoint(tmp_path / "straight" / final)
    b = load_checkpoint(tmp_path / "killed" / final)
    for key in ("model", "student", "optimizer", "framework", "torch_rng", "best_miou", "iteration"):
        assert_states_equal(a[key], b[key], key)
    assert comparable(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == \
        comparable(read_metrics(tmp_path / "killed" / "metrics.jsonl"))


def test_nan_loss_stops_with_the_iteration_and_term(tmp_path, monkeypatch, capsys, tiny_config):
    original = UniMatch.train_step

    def poisoned(self, labelled, unlabelled, iteration):
        out = original(self, labelled, unlabelled, iteration)
        if iteration >= 4:
            out.terms["loss_s1"] = torch.tensor(float("nan"))
            out.loss = out.loss + out.terms["loss_s1"]
        return out

    monkeypatch.setattr(UniMatch, "train_step", poisoned)
    run = tmp_path / "run"
    code = main(["train", str(tiny_config), "train.iterations=10", "train.eval_interval=2", f"output_dir={run}"])
    assert code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "iteration 4" in err and "loss_s1" in err
    state = load_checkpoint(run / "checkpoints" / "ckpt_00000004.pt")  # written before the bad step, still intact
    assert state["iteration"] == 4

    code = main(["train", str(tiny_config), "train.iterations=10", "train.eval_interval=2",
                 "train.max_nonfinite_skips=3", f"output_dir={tmp_path / 'skip'}"])
    assert code == EXIT_NONFINITE
    assert "4 non-finite step(s)" in capsys.readouterr().err  # iterations 4, 5, 6 skipped, 7 stops


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_config, conv_output_dtypes):
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "train.amp=bf16", "weighting.enabled=true", "weighting.reliable=confidence",
                 f"output_dir={run}"]) == 0
    assert conv_output_dtypes == {torch.bfloat16}  # the tiny ResNet has no depthwise layer: every one ran in bf16
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(r["loss"] == r["loss"] for r in records)
