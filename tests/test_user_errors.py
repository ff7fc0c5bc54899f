"""Hostile or broken config files and arguments: one line naming the file and what is wrong, exit 2, never a
traceback, and no value quoted in full; a bug elsewhere keeps its traceback."""

import os
import tracemalloc
from pathlib import Path

import pytest

from hafis.cli import main
from hafis.config import MAX_YAML_NODES, ConfigError, load_config, parse_yaml
from hafis.errors import UserError, one_line, short

TINY = Path(__file__).parent.parent / "configs" / "tiny" / "unimatch.yaml"

#: a 9-way "billion laughs": seven levels of aliases stand for 9^7 = 4.8 million strings
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)) + "name: *g\n"


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


# ------------------------------------------------------------------------ one input contract for every command
class _CreatesAFile:
    """A raw pickle of this would create ``path`` when loaded unsafely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the cases below use: a model-only checkpoint of the tiny config (4 classes, their names recorded),
    one recording other names, a raw pickle that would create a file, a config of 6 classes, a regular file, a
    folder, a photo, a folder dataset of one class, and two damaged compare.json."""
    import json
    import pickle

    import numpy as np
    import torch
    from PIL import Image

    from hafis.config import to_dict
    from hafis.engine.build import build_model

    root = tmp_path_factory.mktemp("inputs")
    config = load_config(TINY)
    torch.manual_seed(0)
    state = {"model": build_model(config, 4).state_dict(), "iteration": 1, "config": to_dict(config),
             "class_names": ["background", "disc", "square", "triangle"]}
    torch.save(state, root / "ckpt.pt")
    torch.save({**state, "class_names": ["background", "a", "b", "c"]}, root / "renamed.pt")
    with open(root / "raw.pt", "wb") as fh:
        pickle.dump({"model": {}, "payload": _CreatesAFile(root / "created_by_unpickling")}, fh, protocol=4)
    (root / "six.yaml").write_text(f"base: {TINY}\ndata: {{synthetic: {{num_object_classes: 5}}}}\n")
    (root / "file").write_text("x")
    (root / "dir").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "photo.png")
    for sub in ("images/train", "masks/train", "images/val", "masks/val"):
        (root / "onecls" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "onecls" / sub / "a.png")
    (root / "onecls" / "classes.txt").write_text("background\n")
    for name, plan in (("cmp1", {"arms": []}), ("cmp2", {"config": 5, "arms": [], "seeds": [0], "common": [],
                                                          "baseline": None, "command": ""})):
        (root / name).mkdir()
        (root / name / "compare.json").write_text(json.dumps(plan))
    return root


CORES = os.cpu_count() or 1
PER_CPU = f"[1, {8 * CORES}] (8 x the {CORES} CPU cores here)"
SEED = "[0, 9223372036854775807]"
UNSAFE = ("checkpoint {r}/raw.pt needs arbitrary pickled objects (it imports pathlib.Path.touch); refused: loading it "
          "could run code; never load a file you did not write yourself with torch.load(weights_only=False) or "
          "pickle, and hafis never needs that")
SIX = ("checkpoint {r}/ckpt.pt predicts 4 classes (['background', 'disc', 'square', 'triangle']), but the config's "
       "dataset (synthetic) has 6 (['background', 'disc', 'square', 'triangle', 'ring', 'cross']); use the config the "
       "checkpoint was trained with")
UNDER_A_FILE = "cannot be created: {r}/file is a file, not a folder"
#: (command line, the one error line's message): {t} the tiny config, {r} the inputs' folder, {o} a fresh output path
CASES = [
    (["train", "{t}", "seed=99999999999999999999999"], f"{{t}}: 'seed' must be in {SEED}, got 99999999999999999999999"),
    (["train", "{t}", "seed=18446744073709551616"], f"{{t}}: 'seed' must be in {SEED}, got 18446744073709551616"),
    (["train", "{t}", "data.synthetic.seed=9223372036854775808"],
     f"{{t}}: 'data.synthetic.seed' must be in {SEED}, got 9223372036854775808"),
    (["train", "{t}", "model.feature_dim=9223372036854775807"],
     "{t}: 'model.feature_dim' must be in (0, 8192], got 9223372036854775807"),
    (["train", "{t}", "data.num_workers=1000000000"],
     f"{{t}}: 'data.num_workers' must be in [0, {8 * CORES}] (8 x the {CORES} CPU cores here), got 1000000000"),
    (["train", "{t}", "model.pretrained=imagnet"],
     "{t}: 'model.pretrained' must be one of [null, 'imagenet', 'dinov2'], got 'imagnet'"),
    (["train", "{t}", "eval.window=abc"], "{t}: 'eval.window' must be int or null, got 'abc' (str)"),
    (["train", "{t}", "data.dataset=folder", "data.root={r}/onecls"],
     "class list {r}/onecls/classes.txt names 1 class(es); a segmentation task needs at least 2"),
    (["train", "{t}", "--nproc", "0"], f"argument --nproc: must be in {PER_CPU}, got 0"),
    (["train", "{t}", "output_dir={r}/file/run"], "output_dir {r}/file/run " + UNDER_A_FILE),
    (["detect", "{t}", "data.dataset=folder", "data.root={r}/onecls", "detector.output_dir={o}"],
     "class list {r}/onecls/classes.txt names 1 class(es); a segmentation task needs at least 2"),
    (["detect", "{t}", "detector.output_dir={r}/file/det"], "detector.output_dir {r}/file/det " + UNDER_A_FILE),
    (["prepare", "folder", "{r}/onecls", "--seed", "-1", "--labelled", "1"], f"--seed must be in {SEED}, got -1"),
    (["prepare", "folder", "{r}/onecls", "--out", "{r}/file/splits"], "--out {r}/file/splits " + UNDER_A_FILE),
    (["eval", "{t}", "--checkpoint", "{r}/raw.pt"], UNSAFE),
    (["predict", "{t}", "{r}/photo.png", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}", "--batch-size", "0"],
     "argument --batch-size: must be in (0, 65536], got 0"),
    (["predict", "{t}", "{r}/photo.png", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}", "--window", "9000"],
     "argument --window: must be in (0, 8192], got 9000"),
    (["predict", "{r}/six.yaml", "{r}/photo.png", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}"], SIX),
    (["predict", "{t}", "{r}/photo.png", "--checkpoint", "{r}/renamed.pt", "--out", "{o}"],
     "checkpoint {r}/renamed.pt was trained on other classes than the config's dataset (synthetic) names: class 1 "
     "is 'a' in the checkpoint, 'disc' here; use the config the checkpoint was trained with"),
    (["predict", "{t}", "{r}/photo.png", "--checkpoint", "{r}/ckpt.pt", "--out", "{r}/file"],
     "--out {r}/file is a file, not a folder"),
    (["predict", "{t}", "{r}/photo.png", "--checkpoint", "{r}/raw.pt", "--out", "{o}"], UNSAFE),
    (["export", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{r}/dir"],
     "--out {r}/dir is a folder; give the path of the file to write (e.g. {r}/dir/model.onnx)"),
    (["export", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{r}/file/m.onnx"],
     "--out {r}/file/m.onnx " + UNDER_A_FILE),
    (["export", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}.onnx", "--tolerance", "-1"],
     "argument --tolerance: must be in (0, 1], got -1.0"),
    (["export", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}.onnx", "--tolerance", "nan"],
     "argument --tolerance: must be finite, in (0, 1], got nan"),
    (["export", "{r}/six.yaml", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}.onnx"], SIX),
    (["export", "{t}", "--checkpoint", "{r}/raw.pt", "--out", "{o}.onnx"], UNSAFE),
    (["export", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{o}.onnx", "--format", "pt2"],
     "argument --format: invalid choice: 'pt2' (choose from 'onnx')"),
    (["visualize", "{t}", "--checkpoint", "{r}/ckpt.pt", "--out", "{r}/file/pics"],
     "--out {r}/file/pics " + UNDER_A_FILE),
    (["compare", "--report-only", "--out", "{r}/cmp1"],
     "--report-only: {r}/cmp1/compare.json is not a plan hafis compare wrote (no 'config' entry); give CONFIG and "
     "the --arm options"),
    (["compare", "--report-only", "--out", "{r}/cmp2"],
     "--report-only: {r}/cmp2/compare.json is not a plan hafis compare wrote ('config' must be str, got int); give "
     "CONFIG and the --arm options"),
    (["compare", "{t}", "--arm", "a: train.iterations=1", "--out", "{r}/file/cmp"],
     "--out {r}/file/cmp " + UNDER_A_FILE),
    (["compare", "{t}", "--arm", "a: train.iterations=1", "--seeds", "18446744073709551616", "--out", "{o}"],
     f"--seeds: each seed must be in {SEED}, got 18446744073709551616"),
    (["compare", "{t}", "--arm", "a: train.iterations=1", "--jobs", "0", "--out", "{o}"],
     f"argument --jobs: must be in {PER_CPU}, got 0"),
    (["demo", "--quick", "--data", "synthetic", "--out", "{r}/file/demo"], "--out {r}/file/demo " + UNDER_A_FILE),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:1] + a[2:])[:60] for a, _ in CASES])
def test_every_command_refuses_a_mistake_in_one_line_before_any_work(tmp_path, capsys, inputs, argv, message):
    out = tmp_path / "out"
    argv = [a.format(t=TINY, r=inputs, o=out) for a in argv]
    if argv[0] == "train":
        argv += [] if any(a.startswith("output_dir=") for a in argv) else [f"output_dir={out}"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits itself
        code = exc.code
    assert code == 2
    assert error_line(capsys, argv[0]) == message.format(r=inputs, t=TINY)
    assert not out.exists() and not Path(f"{out}.onnx").exists()
    assert not (inputs / "created_by_unpickling").exists()


def test_an_output_folder_that_may_not_be_written_is_named(tmp_path, capsys, inputs, monkeypatch):
    import os as os_module

    real = os_module.access
    monkeypatch.setattr(os_module, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert main(["predict", str(TINY), str(inputs / "photo.png"), "--checkpoint", str(inputs / "ckpt.pt"),
                 "--out", str(tmp_path / "masks")]) == 2
    assert error_line(capsys, "predict") == f"--out {tmp_path / 'masks'} cannot be written: no permission to write " \
                                            f"in {tmp_path}"


@pytest.mark.parametrize("text,expected", [
    ("model.pretrained=none", None), ("model.pretrained=None", None), ("model.pretrained=~", None),
    ("model.pretrained=null", None), ("eval.window=none", None), ("weighting.align_corners=NONE", None),
    ("data.root=none", "none"),  # a path keeps the word: a folder may be called none
])
def test_a_key_that_may_be_null_takes_null_and_none(text, expected):
    key = text.partition("=")[0]
    config = load_config(TINY, [text])
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
