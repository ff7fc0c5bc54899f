"""Hostile or broken config files and arguments: one line naming the file and what is wrong, exit 2, never a
traceback, and no value quoted in full; a bug elsewhere keeps its traceback."""

import tracemalloc
from pathlib import Path

import pytest

from hafis.cli import main
from hafis.config import MAX_YAML_NODES, ConfigError, load_config, parse_yaml
from hafis.errors import UserError, one_line, short

TINY = Path(__file__).parent.parent / "configs" / "tiny" / "unimatch.yaml"

#: a 9-way "billion laughs": seven levels of aliases stand for 9^7 = 4.8 million strings
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg")) + "name: *g\n"


def error_line(capsys, command="train"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hafis {command}: error: "), err
    return err[0][len(f"hafis {command}: error: "):]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("text,message", [
    (b"name: \xff\xfe\n", "config file {p} is not UTF-8 text (byte 0xff at offset 6)"),
    ("base: 5\n", "config file {p}: 'base' must be the path of another config file, got 5"),
    ("seed: 1\nseed: 2\n", "config file {p} is not valid YAML: duplicate key 'seed' (first at line 1) in "
                           "\"<unicode string>\", line 2, column 1: seed: 2 ^"),
    ("optim: {lr: 0.1, lr: 0.2}\n", "config file {p} is not valid YAML: duplicate key 'lr' (first at line 1) in "
                                    "\"<unicode string>\", line 1, column 18: optim: {lr: 0.1, lr: 0.2} ^"),
    ("[1, 2]\n", "config file {p} must hold a mapping of keys, got list"),
    ("optim: {lr: " + "9" * 401 + "}\n", "{p}: 'optim.lr' = 999999999999999999...9999999999999999999 is too large "
                                          "for a float"),
    ("output_dir: runs/{nme}\n", "{p}: 'output_dir' = 'runs/{nme}': unknown placeholder {nme}; the only placeholder "
                                 "is {name} (write a literal brace as {{ or }})"),
    ("detector: {output_dir: 'runs/{name'}\n", "{p}: 'detector.output_dir' = 'runs/{name': expected '}' before end "
                                               "of string; the only placeholder is {name} (write a literal brace as "
                                               "{{ or }})"),
    ("name: [" + ", ".join(["1"] * 500) + "]\n", "{p}: 'name' must be str, got [1, 1, 1, 1, 1, 1, ...] (list)"),
    (BOMB, "config file {p}: its aliases (*name) expand to 1.14e+07 values, more than the 20000 a config may hold"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    where = [] if "output_dir: runs" in str(text) else [f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(path), *where, "train.iterations=1", "model.backbone=resnet_tiny"]) == 2
    assert error_line(capsys) == message.replace("{p}", str(path))
    assert not (tmp_path / "run").exists()


def test_merge_keys_may_repeat_a_key_but_a_mapping_may_not():
    assert parse_yaml("base: &b {lr: 1}\noptim: {<<: *b, lr: 2}\n", "x")["optim"] == {"lr": 2}
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        parse_yaml("optim: {<<: {lr: 1}, lr: 2, lr: 3}\n", "x")


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    """A 416-byte file standing for 4.8 million values: refused from the node graph, in far less than 100 MB."""
    path = write(tmp_path, BOMB)
    assert len(BOMB) < 500
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expand to 1.14e"):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6
    assert MAX_YAML_NODES < 1e5
    # an override is YAML too: 200 aliases of a 200-item list
    override = "name={a: &a [" + ", ".join(["x"] * 200) + "], b: [" + ", ".join(["*a"] * 200) + "]}"
    with pytest.raises(ConfigError, match=r"^override 'name=\{a: &a \[x, .*expand to 4.04e\+04 values"):
        load_config(None, [override])


def test_base_of_a_missing_file_and_a_folder(tmp_path, capsys):
    path = write(tmp_path, "base: nowhere.yaml\n")
    assert main(["train", str(path)]) == 2
    assert error_line(capsys) == f"config file {tmp_path / 'nowhere.yaml'} does not exist"
    assert main(["train", str(tmp_path)]) == 2
    assert error_line(capsys) == f"config file {tmp_path} does not exist (it is a folder)"


def test_a_run_folder_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", str(TINY), f"output_dir={tmp_path / 'afile' / 'run'}"]) == 2
    assert error_line(capsys) == f"cannot create run folder {tmp_path / 'afile' / 'run'}: Not a directory"


def test_short_never_builds_the_whole_repr():
    shared = ["x"] * 9
    for _ in range(30):  # 9^30 strings if expanded
        shared = [shared] * 9
    assert len(short(shared)) == 100
    assert short("y" * 10_000) == "'" + "y" * 37 + "..." + "y" * 38 + "'"
    assert short(10 ** 400) == "1" + "0" * 17 + "..." + "0" * 19


def test_a_worker_traceback_becomes_the_workers_one_line():
    text = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise DataError("cannot read image a.png")\n'
            "hafis.data.base.DataError: cannot read image a.png\n")

    class DataError(UserError):
        pass

    DataError.__module__, DataError.__qualname__ = "hafis.data.base", "DataError"
    assert str(DataError(text)) == "cannot read image a.png (in a data-loader worker)"
    assert one_line(FileNotFoundError(text.replace("hafis.data.base.DataError", "FileNotFoundError"))) == \
        "cannot read image a.png (in a data-loader worker)"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError that is no user's error (here: one raised inside the trainer) is not turned into a line."""
    from hafis.engine.trainer import Trainer

    def broken(self):
        raise ValueError("a bug")

    monkeypatch.setattr(Trainer, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", str(TINY), f"output_dir={tmp_path / 'run'}"])


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from hafis.engine.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert main(["train", str(TINY), f"output_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "hafis train: interrupted; continue with --resume (from the last checkpoint)\n"
