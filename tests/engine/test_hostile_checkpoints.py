"""Checkpoints are data: a broken, hostile or foreign one is refused with one line naming the file and what is wrong;
a corrupt newest one falls back to the previous"""

import tracemalloc
import warnings
import zipfile

import pytest
import torch

from hafis.cli import main
from hafis.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from hafis.torch_files import MAX_DEPTH


def error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hafis {command}: error: "), err
    return err[0][len(f"hafis {command}: error: "):]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(tiny_config), f"output_dir={run_dir}", "train.iterations=4", "train.eval_interval=2",
                 "train.tensorboard=false"]) == 0
    return run_dir


def shared_dict(levels):
    d = {"x": 1}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


def crafted(run, tmp_path, case):
    state = torch.load(run / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    path = tmp_path / f"{case}.pt"
    if case == "model_list":
        torch.save({**state, "model": [1, 2]}, path)
    elif case == "iteration_text":
        torch.save({**state, "iteration": "three"}, path)
    elif case == "config_list":
        torch.save({**state, "config": [1]}, path)
    elif case == "nested":
        torch.save({"model": {"w": torch.zeros(1)}, "config": shared_dict(45)}, path)
    elif case == "zip_bomb":  # 200 MB of zeros deflated to 200 KB
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("archive/data.pkl", bytes(200 << 20))
    elif case == "text":
        path.write_text("I am a note, not a checkpoint\n")
    elif case == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case,message", [
    ("model_list", "checkpoint {p}: 'model' must map parameter names to tensors, got list"),
    ("iteration_text", "checkpoint {p}: 'iteration' must be a whole number >= 0, got 'three'"),
    ("config_list", "checkpoint {p}: 'config' must be a mapping, got list"),
    ("nested", f"checkpoint {{p}} nests containers deeper than {MAX_DEPTH} levels; refused"),
    ("zip_bomb", "checkpoint {p} expands to 209715200 bytes from {size} on disk; refused (a torch checkpoint is "
                 "stored uncompressed)"),
    ("text", "checkpoint {p} is unreadable (truncated or corrupt): neither a torch archive nor a pickle"),
    ("empty", "checkpoint {p} is unreadable (truncated or corrupt): neither a torch archive nor a pickle"),
])
def test_a_broken_checkpoint_is_one_line_for_eval(run, tmp_path, capsys, tiny_config, case, message):
    path = crafted(run, tmp_path, case)
    assert main(["eval", str(tiny_config), "--checkpoint", str(path)]) == 2
    assert error_line(capsys, "eval") == message.format(p=path, size=path.stat().st_size)


def test_a_nested_dict_checkpoint_is_refused_within_100_mb(tmp_path):
    """2^45 dicts if walked naively; refused by depth after a few hundred steps."""
    path = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": shared_dict(45)}, path)
    assert path.stat().st_size < 4000
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="deeper than"):
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6
    torch.save({"model": {"w": torch.zeros(1)}, "config": shared_dict(MAX_DEPTH - 2)}, path)
    with pytest.raises(CheckpointError, match="holds more than 2000000 values"):  # shallow enough, but too many
        load_checkpoint(path)


def test_visualize_names_a_model_only_checkpoint(run, tmp_path, capsys, tiny_config):
    path = tmp_path / "model_only.pt"
    torch.save({"model": load_checkpoint(run / "checkpoints" / "ckpt_00000004.pt")["model"]}, path)
    assert main(["eval", str(tiny_config), "--checkpoint", str(path)]) == 0
    capsys.readouterr()
    assert main(["visualize", str(tiny_config), "--checkpoint", str(path), "--out", str(tmp_path / "vis")]) == 2
    assert error_line(capsys, "visualize") == (
        f"checkpoint {path} holds no training state (no 'student' entry); only a checkpoint written by hafis train "
        f"(checkpoints/ckpt_*.pt) can be resumed or visualized")


@pytest.mark.parametrize("case", ["text", "zip_bomb", "empty"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(run, tmp_path, case):
    (tmp_path / "ckpts").mkdir()
    newest = tmp_path / "ckpts" / "ckpt_00000004.pt"
    newest.write_bytes(crafted(run, tmp_path, case).read_bytes())
    previous = tmp_path / "ckpts" / "ckpt_00000002.pt"
    previous.write_bytes((run / "checkpoints" / "ckpt_00000002.pt").read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = CheckpointManager(tmp_path / "ckpts").load_latest()
    assert path == previous and state["iteration"] == 2
    assert f"checkpoint {newest} " in str(caught[0].message) and newest.exists()


@pytest.mark.parametrize("case", ["zip_bomb", "nested", "text"])
def test_a_hostile_pretrained_weights_file_is_one_line(run, tmp_path, capsys, tiny_config, case):
    path = crafted(run, tmp_path, case)
    assert main(["train", str(tiny_config), f"model.pretrained_path={path}", f"output_dir={tmp_path / 'r'}"]) == 2
    line = error_line(capsys, "train")
    assert line.startswith(f"model (name='deeplabv3plus', backbone='resnet_tiny'): weights file {path} ")
    assert line.endswith({"zip_bomb": "refused (a torch checkpoint is stored uncompressed)",
                          "nested": f"nests containers deeper than {MAX_DEPTH} levels; refused",
                          "text": "neither a torch archive nor a pickle"}[case])


@pytest.mark.parametrize("entry,network,message", [
    ({"student": [1]}, "student", "checkpoint {p}: the student entry is not a mapping of parameter names to tensors"),
    ({"framework": [1], "config": {"train": 3}}, "teacher",
     "--network teacher: checkpoint {p} (framework '?') has no teacher; mean-teacher frameworks (u2pl, ael, "
     "augseg) have one"),
])
def test_predict_names_a_hostile_network_entry(run, tmp_path, capsys, tiny_config, entry, network, message):
    from PIL import Image

    state = torch.load(run / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    path = tmp_path / "hostile.pt"
    torch.save({**state, **entry}, path)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["predict", str(tiny_config), str(tmp_path / "a.png"), "--checkpoint", str(path), "--out",
                 str(tmp_path / "out"), "--network", network]) == 2
    assert error_line(capsys, "predict") == message.format(p=path)
