"""A run folder is owned: a second `hafis train` is refused without --resume, a live trainer's lock keeps another
out (a dead one's does not), --resume cuts metrics.jsonl back to its checkpoint, stale temporary files go."""

import json
import os
import subprocess
import sys

from hafis.cli import main
from hafis.engine import run_folder
from hafis.engine.run_log import read_metrics


def train(tiny_config, run_dir, *extra):
    return main(["train", str(tiny_config), f"output_dir={run_dir}", "train.tensorboard=false", *map(str, extra)])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hafis train: error: "), err
    return err[0][len("hafis train: error: "):]


def files(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_finished_run_is_refused_then_resumed_or_overwritten(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    assert train(tiny_config, run_dir) == 0
    before = files(run_dir)
    assert train(tiny_config, run_dir, "seed=1") == 2
    assert error_line(capsys) == (f"run folder {run_dir} already holds a run with checkpoints up to iteration 3; "
                                  f"continue it with --resume, choose another name or output_dir, or discard it "
                                  f"with --overwrite")
    assert files(run_dir) == before
    (run_dir / "notes.txt").write_text("mine")
    assert train(tiny_config, run_dir, "seed=1", "--overwrite") == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]  # one experiment, not two mixed
    assert (run_dir / "notes.txt").read_text() == "mine"  # only what a run writes is discarded


def test_a_partial_run_without_checkpoint_is_refused(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n')
    assert train(tiny_config, run_dir) == 2
    assert error_line(capsys).startswith(f"run folder {run_dir} already holds a partial run (records in "
                                         f"metrics.jsonl, no checkpoint); continue it with --resume")
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "config.yaml").write_text("x: 1\n")  # a run that never logged holds nothing to lose
    assert run_folder.describe_run(run_dir) is None


def test_resume_without_checkpoint_drops_the_dead_runs_records(tmp_path, capsys, tiny_config):
    """Killed before its first checkpoint: --resume starts over, and iteration 1 is not logged twice."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1, "loss": 9.0}\n{"iteration": 2, "loss"')
    assert train(tiny_config, run_dir, "--resume") == 0
    assert "no checkpoint found; starting" in capsys.readouterr().out
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3] and records[0]["loss"] != 9.0


def test_resume_cuts_records_past_the_checkpoint_and_a_torn_line(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    assert train(tiny_config, run_dir, "train.iterations=4", "train.eval_interval=2") == 0
    (run_dir / "checkpoints" / "ckpt_00000004.pt").unlink()  # as if killed after iteration 4's records
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 5, "loss": 1.0}\n{"iteration": 6, "lo')  # ... and mid-line
    straight = tmp_path / "straight"
    assert train(tiny_config, straight, "train.iterations=4", "train.eval_interval=2") == 0
    assert train(tiny_config, run_dir, "train.iterations=4", "train.eval_interval=2", "--resume") == 0
    assert "at iteration 2" in capsys.readouterr().out

    def comparable(path):
        return [{k: v for k, v in r.items() if k != "seconds_per_iteration"} for r in read_metrics(path)]

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole
    assert comparable(run_dir / "metrics.jsonl") == comparable(straight / "metrics.jsonl")


def test_a_live_lock_refuses_a_dead_ones_does_not(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    with run_folder.claim(run_dir):  # another trainer holds the folder
        assert train(tiny_config, run_dir) == 2
        assert error_line(capsys) == (f"run folder {run_dir} is in use by another hafis process (pid {os.getpid()}, "
                                      f"lock {run_dir / '.lock'}); wait for it to end, or choose another name or "
                                      f"output_dir")
        assert not (run_dir / "metrics.jsonl").exists()
    # a process that took the lock and died: its lock file stays, its lock does not
    code = f"from hafis.engine import run_folder; run_folder.claim({str(run_dir)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (run_dir / ".lock").read_text().strip().isdigit()
    assert train(tiny_config, run_dir) == 0


def test_stale_temporary_checkpoints_are_removed_under_the_lock(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    assert train(tiny_config, run_dir) == 0
    stale = [run_dir / "checkpoints" / ".ckpt_00000003.pt.tmp-4242",  # an older hafis's name
             run_dir / "checkpoints" / ".ckpt_00000003.pt.0a1b2c3d.tmp", run_dir / ".config.yaml.99aa88bb.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (run_dir / "checkpoints" / "keep.tmp").write_text("not ours")
    assert train(tiny_config, run_dir, "--resume") == 0
    assert not any(p.exists() for p in stale)
    assert (run_dir / "checkpoints" / "keep.tmp").exists()
