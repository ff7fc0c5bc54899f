"""The one atomic writer: a full disk is named, the previous file stays whole, no temporary file is left, and every
JSON file is strict."""

import errno
import json
import math

import pytest
import torch

from hafis import files
from hafis.cli import main
from hafis.engine.checkpoint import CheckpointManager, load_checkpoint
from hafis.engine.run_log import RunLog, read_metrics
from hafis.files import WriteError, append_line, atomic_write, json_dumps


class FullDisk:
    """A file whose disk fills up after ``room`` bytes: a write past it raises ENOSPC (after writing what fits)."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def fill_disk_after(monkeypatch, room):
    real = files._open_fd
    monkeypatch.setattr(files, "_open_fd", lambda fd: FullDisk(real(fd), room))


def strict_records(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_full_disk_mid_checkpoint_is_named_and_keeps_the_previous_one(tmp_path, monkeypatch, room):
    manager = CheckpointManager(tmp_path, keep=2)
    state = {"model": {"w": torch.arange(4096.0)}, "iteration": 1}
    manager.save(state, 1)
    before = (tmp_path / "ckpt_00000001.pt").read_bytes()
    fill_disk_after(monkeypatch, room)
    with pytest.raises(WriteError) as info:
        manager.save({**state, "iteration": 2}, 2)
    assert str(info.value) == f"cannot write {tmp_path / 'ckpt_00000002.pt'}: no space left on device"
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]  # no temporary file left
    assert (tmp_path / "ckpt_00000001.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "ckpt_00000001.pt")["iteration"] == 1


def test_a_full_disk_during_training_is_one_line_exit_2(tmp_path, monkeypatch, capsys, tiny_config):
    fill_disk_after(monkeypatch, 1000)
    run_dir = tmp_path / "run"
    assert main(["train", str(tiny_config), f"output_dir={run_dir}", "train.tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hafis train: error: cannot write {run_dir / 'config.yaml'}: no space left on device"]


def test_a_metrics_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = RunLog(tmp_path, tensorboard=False)
    log.write({"iteration": 1, "loss": 0.5})

    def short_write(fd, data):  # the disk takes 7 bytes of the line, then is full
        import os
        os.write(fd, data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write", short_write)
    with pytest.raises(WriteError, match=r"metrics.jsonl: no space left on device$"):
        log.write({"iteration": 2, "loss": 0.25})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1, "loss": 0.5}\n'


def test_a_failed_writer_leaves_no_temporary_file_and_the_old_content(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def broken(fh):
        fh.write(b"new, half")
        raise KeyError("a bug in the writer")

    with pytest.raises(KeyError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    atomic_write(target, "new")
    assert target.read_text() == "new"


def test_strict_json_writes_nan_as_null_and_infinity_as_a_string():
    assert json_dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": torch.tensor(float("nan")),
                       "d": (1, 2)}) == '{"a": null, "b": ["inf", "-inf", 1.5], "c": null, "d": [1, 2]}'
    with pytest.raises(ValueError):
        json.dumps(math.nan, allow_nan=False)


def test_metrics_of_skipped_nonfinite_steps_stay_strict_json(tmp_path, monkeypatch, tiny_config):
    from hafis.frameworks.unimatch import UniMatch

    original = UniMatch.train_step

    def poisoned(self, labelled, unlabelled, iteration):
        out = original(self, labelled, unlabelled, iteration)
        if iteration == 1:
            out.terms["loss_s1"] = torch.tensor(float("nan"))
            out.loss = out.loss + out.terms["loss_s1"]
        return out

    monkeypatch.setattr(UniMatch, "train_step", poisoned)
    run_dir = tmp_path / "run"
    assert main(["train", str(tiny_config), "train.max_nonfinite_skips=1", f"output_dir={run_dir}"]) == 0
    records = strict_records(run_dir / "metrics.jsonl")
    assert records[1]["iteration"] == 2 and records[1]["loss"] is None and records[1]["loss_s1"] is None
    assert read_metrics(run_dir / "metrics.jsonl") == records


def test_append_line_names_an_unwritable_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(WriteError, match="^cannot write .*folder: Is a directory$"):
        append_line(tmp_path / "folder", "x")
