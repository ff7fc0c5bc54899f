"""The published splits shipped with hafis and ``hafis prepare --published``: the releases' lists, written exactly,
only onto a tree that has every listed image, never over a different split file."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import hafis.data
from hafis.cli import main
from hafis.config import load_config
from hafis.data import published
from hafis.data.splits import make_layout, published_lists, split_ids

SHIPPED = Path(hafis.data.__file__).parent / "published_splits"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

#: the labelled count of every shipped list (the counts the papers report)
COUNTS = {
    ("unimatch", "voc"): {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464},
    ("unimatch", "cityscapes"): {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488},
    ("unimatch", "coco"): {"1_512": 232, "1_256": 463, "1_128": 925, "1_64": 1849, "1_32": 3697},
    ("unimatch", "ade20k"): {"1_64": 316, "1_32": 631, "1_16": 1263, "1_8": 2526, "1_4": 5052, "1_2": 10105},
    ("u2pl", "voc"): {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464, "1_16": 662, "1_8": 1323,
                      "1_4": 2646, "1_2": 5291},
    ("u2pl", "cityscapes"): {"1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488},
}
#: (archive, member): (lines, first line, last line), as the releases hold them
KNOWN = {
    ("unimatch_cityscapes", "cityscapes/1_30/labeled.txt"): (
        100, "leftImg8bit/train/weimar/weimar_000085_000019_leftImg8bit.png "
             "gtFine/train/weimar/weimar_000085_000019_gtFine_labelTrainIds.png",
        "leftImg8bit/train/bremen/bremen_000177_000019_leftImg8bit.png "
        "gtFine/train/bremen/bremen_000177_000019_gtFine_labelTrainIds.png"),
    ("unimatch_voc", "pascal/92/labeled.txt"): (
        92, "JPEGImages/2007_000733.jpg SegmentationClass/2007_000733.png",
        "JPEGImages/2008_004822.jpg SegmentationClass/2008_004822.png"),
    ("unimatch_ade20k", "ade20k/1_64/labeled.txt"): (
        316, "images/training/ADE_train_00001609.jpg annotations/training/ADE_train_00001609.png",
        "images/training/ADE_train_00009661.jpg annotations/training/ADE_train_00009661.png"),
    ("unimatch_ade20k", "ade20k/all/labeled.txt"): (
        20210, "images/training/ADE_train_00000001.jpg annotations/training/ADE_train_00000001.png",
        "images/training/ADE_train_00020210.jpg annotations/training/ADE_train_00020210.png"),
    ("unimatch_coco", "coco/1_512/labeled.txt"): (
        232, "train2017/000000177254.jpg masks/000000177254.png", "train2017/000000143516.jpg masks/000000143516.png"),
    ("u2pl_voc", "pascal/662/labeled.txt"): (662, "2011_000068", "2011_001475"),
    ("u2pl_voc", "pascal/92/unlabeled.txt"): (10490, "2009_000898", "2008_007473"),
    ("u2pl_cityscapes", "cityscapes/744/labeled.txt"): (
        744, "leftImg8bit/train/ulm/ulm_000079_000019_leftImg8bit.png",
        "leftImg8bit/train/zurich/zurich_000005_000019_leftImg8bit.png"),
}


def member_lines(archive: str, member: str) -> list[str]:
    """A shipped list read with tarfile alone (not through hafis.data.published)."""
    with tarfile.open(SHIPPED / f"{archive}.tar.xz", "r:xz") as tar:
        text = tar.extractfile(member).read().decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_shipped_lists_are_the_releases():
    for (archive, member), (n, first, last) in KNOWN.items():
        lines = member_lines(archive, member)
        assert (len(lines), lines[0], lines[-1]) == (n, first, last), member
    for key, counts in COUNTS.items():
        rel = published.release(*key)
        lists = published.read_lists(rel)
        assert {s.folder: len(set(lists[s.member])) for s in rel.splits} == counts, key
    assert (SHIPPED / "README.md").is_file()
    assert sum(p.stat().st_size for p in SHIPPED.glob("*.tar.xz")) < 256 * 1024  # compressed: 187 KiB


def test_unlabelled_is_the_rest_of_the_release_training_list(voc_tree):
    # VOC: no image is read; the training set comes from the shipped lists, not from the tree
    classic, blended = make_layout("voc", voc_tree), make_layout("voc", voc_tree, voc_setting="blended")
    _, [(split, labelled, unlabelled)] = published_lists(blended, "u2pl", "662")
    assert (split.folder, split.setting, len(labelled), len(unlabelled)) == ("1_16", "blended", 662, 10582 - 662)
    assert not set(labelled) & set(unlabelled) and next(iter(labelled)) == "2011_000068"
    _, [(_, uni, uni_rest)] = published_lists(classic, "unimatch", "92")
    _, [(_, u2pl, u2pl_rest)] = published_lists(classic, "u2pl", "92")
    assert list(uni) == list(u2pl) and set(uni_rest) == set(u2pl_rest)  # the classic lists are the same
    assert uni["2007_000733"] == "JPEGImages/2007_000733.jpg SegmentationClass/2007_000733.png"  # lines as released
    assert u2pl["2007_000733"] == "2007_000733"


@pytest.fixture(scope="module")
def cityscapes_files(tmp_path_factory):
    """Every training image of the shipped Cityscapes list as an empty file (existence is what --no-check needs);
    built once for this module's tests, which leave its images as they found them."""
    root = tmp_path_factory.mktemp("published") / "cityscapes"
    train = member_lines("unimatch_cityscapes", "cityscapes/all/train.txt")
    paths = [root / line.split()[0] for line in train]
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True)
    for path in paths:
        open(path, "wb").close()
    val = root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    val.parent.mkdir(parents=True)
    val.touch()
    return root, train


def test_prepare_published_writes_the_exact_lists(cityscapes_files, capsys):
    root, train = cityscapes_files
    code, out, err = run(capsys, "cityscapes", root, "--published", "unimatch", "--split", "1_30", "--no-check")
    assert code == 0, err
    folder = root / "splits" / "unimatch" / "1_30"
    shipped = member_lines("unimatch_cityscapes", "cityscapes/1_30/labeled.txt")
    assert (folder / "labelled.txt").read_text() == "".join(f"{line}\n" for line in shipped)
    labelled = (folder / "labelled.txt").read_text().splitlines()
    assert (len(labelled), labelled[0], labelled[-1]) == (100, *KNOWN[("unimatch_cityscapes",
                                                                      "cityscapes/1_30/labeled.txt")][1:])
    unlabelled = (folder / "unlabelled.txt").read_text().splitlines()
    taken = {line.split()[0] for line in shipped}
    assert unlabelled == [line for line in train if line.split()[0] not in taken] and len(unlabelled) == 2875
    assert (folder / "val.txt").read_text() == "frankfurt/frankfurt_000000_000294\n"
    assert (f"wrote {folder}/{{labelled,unlabelled,val}}.txt: 100 labelled, 2875 unlabelled, 1 val "
            f"(LiheYoung/UniMatch-V2@f6afb4d splits/cityscapes/1_30/labeled.txt)") in out
    # the paper config of that split reads exactly these files
    config = load_config(CONFIGS / "cityscapes" / "1_30" / "unimatch.yaml")
    lab, unl, _ = split_ids(make_layout("cityscapes", root), config.data.labelled_split, config.data.unlabelled_split,
                            "splits/unimatch/1_30/val.txt")
    assert (len(lab), lab[0], len(unl)) == (100, "weimar/weimar_000085_000019", 2875)

    # again: the same files, nothing to refuse; U2PL's lists of the same tree go to their own folder
    assert run(capsys, "cityscapes", root, "--published", "unimatch", "--split", "1_30", "--no-check")[0] == 0
    assert run(capsys, "cityscapes", root, "--published", "u2pl", "--split", "744", "--no-check")[0] == 0
    u2pl = (root / "splits" / "u2pl" / "1_4" / "labelled.txt").read_text().splitlines()
    assert (len(u2pl), u2pl[0]) == (744, "leftImg8bit/train/ulm/ulm_000079_000019_leftImg8bit.png")

    # a split file that differs is not replaced
    edited = (folder / "labelled.txt").read_text() + "leftImg8bit/train/ulm/ulm_000079_000019_leftImg8bit.png\n"
    (folder / "labelled.txt").write_text(edited)
    code, _, err = run(capsys, "cityscapes", root, "--published", "unimatch", "--no-check")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{folder / 'labelled.txt'} exists and differs from the published list; nothing written" in err
    assert (folder / "labelled.txt").read_text() == edited and not (root / "splits" / "unimatch" / "1_16").exists()


def test_prepare_published_refuses_a_tree_missing_a_listed_image(cityscapes_files, capsys, tmp_path):
    root, train = cityscapes_files
    gone = [root / train[7].split()[0], root / train[2000].split()[0]]
    for path in gone:
        path.rename(tmp_path / path.name)
    try:
        code, out, err = run(capsys, "cityscapes", root, "--published", "unimatch", "--split", "1_30", "--out",
                             tmp_path / "out")
    finally:
        for path in gone:
            (tmp_path / path.name).rename(path)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"hafis prepare: error: 2 of the 2975 images of UniMatch V2's cityscapes lists are "
                                f"missing, the first: {gone[0]}; nothing written"]
    assert not (tmp_path / "out").exists()


def test_prepare_published_usage_errors(cityscapes_tree, ade20k_tree, voc_tree, capsys):
    def error(*argv):
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "give --published too" in error("cityscapes", cityscapes_tree, "--split", "1_16")
    assert "ade20k has: unimatch" in error("ade20k", ade20k_tree, "--published", "u2pl")
    assert "publishes no blended voc lists" in error("voc", voc_tree, "--published", "unimatch", "--setting",
                                                     "blended")
    assert "1_16 (186), 1_8 (372), 1_4 (744), 1_2 (1488)" in error("cityscapes", cityscapes_tree, "--published",
                                                                   "u2pl", "--split", "1_30")
    assert "give --split too" in error("cityscapes", cityscapes_tree, "--published", "unimatch", "--out", "x")
    with pytest.raises(SystemExit) as exc:  # one way to choose the labelled images at a time
        main(["prepare", "cityscapes", str(cityscapes_tree), "--published", "unimatch", "--labelled", "2"])
    assert exc.value.code == 2


def test_prepare_published_coco_takes_the_rest_of_the_tree_train2017(coco_tree, monkeypatch, capsys, tmp_path):
    # the shipped COCO lists name 118,287 images; a one-line stand-in for 1/512 on the four-image tree
    rel = published.release("unimatch", "coco")
    monkeypatch.setattr(published, "read_lists", lambda r: {s.member: ["train2017/000000000002.jpg "
                                                                       "masks/000000000002.png"] for s in rel.splits})
    code, out, err = run(capsys, "coco", coco_tree, "--published", "unimatch", "--split", "1_512", "--no-check",
                         "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    folder = coco_tree / "splits" / "unimatch" / "1_512"
    assert (folder / "labelled.txt").read_text() == "train2017/000000000002.jpg masks/000000000002.png\n"
    assert (folder / "unlabelled.txt").read_text() == "000000000001\n000000000003\n000000000004\n"
