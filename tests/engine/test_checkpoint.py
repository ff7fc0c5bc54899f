import pytest
import torch

from hafis.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_atomic


def test_round_trip_and_rotation(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for it in (10, 20, 30):
        manager.save({"model": {"w": torch.tensor([it])}, "iteration": it}, it)
    assert [p.name for p in manager.list()] == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    path, state = manager.load_latest()
    assert path.name == "ckpt_00000030.pt" and state["iteration"] == 30
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_truncated_checkpoint_is_reported_and_previous_used(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({"model": {}, "iteration": 1}, 1)
    newest = manager.save({"model": {"w": torch.zeros(1000)}, "iteration": 2}, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=str(newest.name)):
        path, state = manager.load_latest()
    assert state["iteration"] == 1
    assert newest.exists()  # the bad file is kept for inspection, not deleted


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"model": {}, "iteration": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_atomic({"model": {}, "iteration": 2}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
