"""Broken or hostile dataset files met by `hafis train`: one line naming the file and what is wrong, exit 2 (also
from a data-loader worker process); a resumed run checks its split files' content like its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from hafis.cli import main
from hafis.engine.run_log import read_metrics

TINY_CONFIG = Path(__file__).parents[2] / "configs" / "tiny" / "unimatch.yaml"
TINY = ["data.crop_size=32", "data.scale_range=[0.75,1.25]", "model.backbone=resnet_tiny", "model.pretrained=null",
        "model.feature_dim=32", "model.aspp_channels=32", "train.iterations=2", "train.eval_interval=2",
        "train.batch_size=2", "train.unlabelled_batch_size=2", "train.progress_bar=false", "train.tensorboard=false",
        "train.device=cpu", "eval.batch_size=2", "weighting.reliable=confidence"]


def train(dataset, root, tmp_path, *extra):
    return main(["train", str(TINY_CONFIG), f"data.dataset={dataset}", f"data.root={root}",
                 f"output_dir={tmp_path / 'run'}", *TINY, *extra])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hafis train: error: "), err
    return err[0][len("hafis train: error: "):]


@pytest.mark.parametrize("line", ["../../outside/x", "/etc/passwd", "train/../../x", "..\\..\\x"])
def test_a_split_id_that_leaves_the_dataset_root_is_refused(folder_tree, tmp_path, capsys, line):
    (folder_tree / "split.txt").write_text(f"train/a\n{line}\n")
    assert train("folder", folder_tree, tmp_path, "data.labelled_split=split.txt") == 2
    # the folder format keeps the path as the id
    assert error_line(capsys) == (f"split file {folder_tree / 'split.txt'} line 2: id {line!r} leaves the dataset "
                                  f"root")
    assert not (tmp_path / "run").exists()


def test_a_bad_cityscapes_id_in_a_split_names_the_line(cityscapes_tree, tmp_path, capsys):
    (cityscapes_tree / "split.txt").write_text("# ids\nnot-an-id\n")
    assert train("cityscapes", cityscapes_tree, tmp_path, "data.labelled_split=split.txt") == 2
    assert error_line(capsys) == (f"split file {cityscapes_tree / 'split.txt'} line 2: 'not-an-id' is not a "
                                  f"Cityscapes image id (<city>_<seq>_<frame>)")


def test_a_split_file_that_is_not_text(folder_tree, tmp_path, capsys):
    (folder_tree / "split.txt").write_bytes(b"train/a\n\xff\xd8\xff\n")
    assert train("folder", folder_tree, tmp_path, "data.labelled_split=split.txt") == 2
    assert error_line(capsys) == f"split file {folder_tree / 'split.txt'} is not UTF-8 text (byte offset 8)"


def test_a_broken_image_read_by_a_worker_process_is_one_line(folder_tree, tmp_path, capsys):
    image = folder_tree / "images" / "train" / "b.jpg"
    image.write_bytes(b"not a jpeg")
    assert train("folder", folder_tree, tmp_path, "data.num_workers=2") == 2
    assert error_line(capsys) == (f"cannot read image {image} (UnidentifiedImageError: cannot identify image file "
                                  f"'{image}') (in a data-loader worker)")


def test_a_decompression_bomb_is_the_one_line_error(folder_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24 x 24 images are then "bombs" (> 2 x the limit)
    assert train("folder", folder_tree, tmp_path) == 2
    line = error_line(capsys)
    assert line.startswith(f"image {folder_tree / 'images' / 'train'}") and line.endswith(
        "is refused: Image size (576 pixels) exceeds limit of 200 pixels, could be decompression bomb DOS attack.")


@pytest.mark.parametrize("case,message", [
    ("malformed", "{json} is not valid JSON (Expecting ',' delimiter: line 1 column {col} (char {char}))"),
    ("no_height", "{json} is not a usable COCO instances file: an entry lacks the key 'height'"),
    ("unknown_category", "{json}: an annotation of image 000000000002.jpg cannot be rasterised: category id 999 is "
                         "not in 'categories' (`hafis prepare coco {root}` lists every problem)"),
    ("not_coco", "{json} has no 'images' list; is it a COCO instances file?"),
])
def test_a_broken_coco_json_is_one_line(coco_tree, tmp_path, capsys, case, message):
    path = coco_tree / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    text = json.dumps(data)
    if case == "malformed":
        cut = text.index('"annotations"')
        text = text[:cut - 2] + text[cut:]  # the comma before "annotations" is gone
        message = message.replace("{col}", str(cut - 1)).replace("{char}", str(cut - 2))
    elif case == "no_height":
        del data["images"][0]["height"]
    elif case == "unknown_category":
        next(a for a in data["annotations"] if a["image_id"] == 2)["category_id"] = 999
    else:
        data = [data]
    path.write_text(text if case == "malformed" else json.dumps(data))
    assert train("coco", coco_tree, tmp_path, f"data.cache_dir={tmp_path / 'cache'}") == 2
    assert error_line(capsys) == message.format(json=path, root=coco_tree)


def test_a_changed_split_file_is_refused_on_resume_unless_allowed(folder_tree, tmp_path, capsys):
    root = folder_tree
    (root / "labelled.txt").write_text("train/a\ntrain/b\n")
    run_dir = tmp_path / "run"
    args = ["train", str(TINY_CONFIG), "data.dataset=folder", f"data.root={root}", "data.labelled_split=labelled.txt",
            "data.crop_size=16", f"output_dir={run_dir}", "train.tensorboard=false"]
    assert main(args) == 0
    (root / "labelled.txt").write_text("train/a\ntrain/sub/c\n")
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert main([*args, "train.iterations=4", "--resume", "--allow-change", "train.iterations"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"cannot resume from {run_dir / 'checkpoints' / 'ckpt_00000003.pt'}: the config changed "
                           f"the experiment (data.labelled_split: 'file content ")
    assert line.endswith("'); start a new run (another name or output_dir), or accept with --allow-change KEY")
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert main([*args, "train.iterations=4", "--resume", "--allow-change", "train.iterations", "--allow-change",
                 "data.labelled_split"]) == 0
    change = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume_with_changes"]
    assert sorted(change[0]["changed"]) == ["data.labelled_split", "train.iterations"]


def test_a_class_list_that_is_not_text(folder_tree, tmp_path, capsys):
    (folder_tree / "classes.txt").write_bytes(b"background\n\xff\xfeleaf\n")
    assert train("folder", folder_tree, tmp_path) == 2
    assert error_line(capsys) == f"class list {folder_tree / 'classes.txt'} is not UTF-8 text (byte offset 11)"


def test_a_split_file_saved_with_a_byte_order_mark_reads_its_first_id(folder_tree):
    from hafis.data.splits import read_split

    (folder_tree / "split.txt").write_bytes("\ufefftrain/a\r\ntrain/b\r\n".encode())
    assert read_split(folder_tree / "split.txt") == ["train/a", "train/b"]
