"""``hafis prepare``: every problem of a broken tree listed at once with its path; deterministic split files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from hafis.cli import main
from hafis.config import load_config
from hafis.data import build_sources
from hafis.data.splits import LabelledCount, choose_labelled, read_split


def run(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_lists_every_problem_of_a_broken_voc_tree(voc_tree, mini, capsys):
    fine, aug, val = mini.VOC_FINE_TRAIN, mini.VOC_AUG_ONLY, mini.VOC_VAL
    missing_image = voc_tree / "JPEGImages" / f"{fine[0]}.jpg"
    missing_image.unlink()
    corrupt_image = voc_tree / "JPEGImages" / f"{aug[0]}.jpg"
    corrupt_image.write_bytes(b"this is not a jpeg")
    wrong_size = voc_tree / "SegmentationClass" / f"{fine[1]}.png"
    mini.save_palette(wrong_size, np.zeros((30, 30), np.uint8))
    bad_values = voc_tree / "SegmentationClass" / f"{fine[2]}.png"
    mask = mini.voc_fine_mask()
    mask[0, 0], mask[0, 1] = 30, 21
    mini.save_palette(bad_values, mask)
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_tree / folder / f"{val[0]}.png").unlink()
    corrupt_mask = voc_tree / "SegmentationClassAug" / f"{aug[1]}.png"
    corrupt_mask.write_bytes(b"\x89PNG broken")

    code, out, err = run(capsys, "voc", voc_tree, "--labelled", "2", "--seed", "0")
    assert code == 1
    assert "6 problem(s)" in out and "nothing written" in err
    lines = [line.strip() for line in out.splitlines()[1:]]
    expected = {
        str(missing_image): "missing image",
        str(corrupt_image): "unreadable image",
        str(wrong_size): "mask is 30x30 (WxH) but its image is 40x32",
        str(bad_values): "label value(s) 21, 30 outside the class range 0..20",
        str(voc_tree / "SegmentationClass" / f"{val[0]}.png"): f"missing mask of val image '{val[0]}'",
        str(corrupt_mask): "unreadable mask",
    }
    for path, message in expected.items():
        assert any(line.startswith(f"{path}: {message}") for line in lines), (path, message, out)
    assert len(lines) == 6
    assert not (voc_tree / "splits").exists()


def test_prepare_on_broken_cityscapes_coco_and_folder_trees(cityscapes_tree, coco_tree, folder_tree, mini, capsys,
                                                            tmp_path):
    gt = cityscapes_tree / "gtFine" / "train"
    converted = gt / f"{mini.CS_TRAIN[2]}_gtFine_labelIds.png"
    raw = mini.cs_label_ids()
    raw[0, 0] = 40
    mini.save_grey(converted, raw)
    small = gt / f"{mini.CS_TRAIN[0]}_gtFine_labelTrainIds.png"
    mini.save_grey(small, np.zeros((16, 32), np.uint8))
    code, out, _ = run(capsys, "cityscapes", cityscapes_tree)
    assert code == 1 and "2 problem(s)" in out
    assert f"{converted}: label id value(s) 40 outside the Cityscapes label ids 0..33" in out
    assert f"{small}: mask is 32x16 (WxH) but its image is 64x32" in out

    ann = coco_tree / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 12  # a gap in COCO's ids
    data["annotations"][2]["segmentation"]["size"] = [5, 5]
    ann.write_text(json.dumps(data))
    (coco_tree / "train2017" / f"{3:012d}.jpg").unlink()
    mini.save_jpeg(coco_tree / "train2017" / f"{4:012d}.jpg", 10, 10)
    code, out, _ = run(capsys, "coco", coco_tree, "--cache-dir", tmp_path / "cache")
    assert code == 1 and "4 problem(s)" in out
    assert "category id 12 is not in 'categories'" in out
    assert "RLE size [5, 5] differs from the image's [30, 40]" in out
    assert f"{coco_tree / 'train2017' / f'{3:012d}.jpg'}: missing image" in out
    assert "image is 10x10 but" in out and "says 32x24" in out

    colour = folder_tree / "masks" / "train" / "a.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(colour)
    (folder_tree / "masks" / "val" / "v1.png").unlink()
    code, out, _ = run(capsys, "folder", folder_tree)
    assert code == 1 and "2 problem(s)" in out
    assert f"{colour}: unreadable mask" in out and "single-channel" in out
    assert f"{folder_tree / 'masks' / 'val' / 'v1.png'}: missing mask of val image 'val/v1'" in out


def test_prepare_writes_deterministic_nested_splits_that_train_reads(voc_tree, mini, capsys, tmp_path):
    code, out, _ = run(capsys, "voc", voc_tree, "--labelled", "2", "--seed", "7")
    assert code == 0, out
    folder = voc_tree / "splits" / "classic" / "2"
    labelled = read_split(folder / "labelled.txt")
    unlabelled = read_split(folder / "unlabelled.txt")
    assert len(labelled) == 2 and set(labelled) <= set(mini.VOC_FINE_TRAIN)
    assert sorted(unlabelled + labelled) == sorted(mini.VOC_FINE_TRAIN + mini.VOC_AUG_ONLY)
    assert read_split(folder / "val.txt") == list(mini.VOC_VAL)
    assert json.loads((folder / "prepare.json").read_text())["counts"] == {"labelled": 2, "unlabelled": 5, "val": 2}
    # same seed: same files; a smaller split of the same seed is a subset
    assert run(capsys, "voc", voc_tree, "--labelled", "2", "--seed", "7", "--out", tmp_path / "again")[0] == 0
    assert (tmp_path / "again" / "labelled.txt").read_text() == (folder / "labelled.txt").read_text()
    assert run(capsys, "voc", voc_tree, "--labelled", "1", "--seed", "7", "--out", tmp_path / "one")[0] == 0
    assert set(read_split(tmp_path / "one" / "labelled.txt")) <= set(labelled)

    config = load_config(None, ["data.dataset=voc", f"data.root={voc_tree}",
                                "data.labelled_split=splits/classic/2/labelled.txt",
                                "data.unlabelled_split=splits/classic/2/unlabelled.txt",
                                "data.val_split=splits/classic/2/val.txt"])
    sources = build_sources(config.data)
    assert [len(s) for s in sources] == [2, 5, 2]
    assert list(sources[0].ids) == labelled


def test_fractions_give_the_published_counts_and_usage_errors_exit_2(cityscapes_tree, capsys):
    assert [LabelledCount.parse(f).resolve(10582) for f in ("1/16", "1/8", "1/4")] == [662, 1323, 2646]
    assert [LabelledCount.parse(f).resolve(2975) for f in ("1/16", "0.125", "1/4", "1/2")] == [186, 372, 744, 1488]
    assert [LabelledCount.parse(f"1/{d}").resolve(118287) for d in (512, 256, 128, 64, 32)] == \
        [232, 463, 925, 1849, 3697]
    assert LabelledCount.parse("0.0625").label == "1_16"
    assert choose_labelled(["c", "a", "b"], 2, 0) == choose_labelled(["a", "b", "c"], 2, 0)

    code, out, _ = run(capsys, "cityscapes", cityscapes_tree, "--labelled", "1/2")
    assert code == 0, out
    assert len(read_split(cityscapes_tree / "splits" / "1_2" / "labelled.txt")) == 2  # ceil(3 / 2)
    assert len(read_split(cityscapes_tree / "splits" / "1_2" / "unlabelled.txt")) == 2
    code, _, err = run(capsys, "cityscapes", cityscapes_tree, "--labelled", "7")
    assert code == 2 and "exceeds the 3 images" in err
    code, _, err = run(capsys, "cityscapes", cityscapes_tree, "--labelled", "half")
    assert code == 2 and "neither a count" in err
    code, _, err = run(capsys, "voc", cityscapes_tree / "nope")
    assert code == 2 and "does not exist" in err
