"""ADE20K (``ADEChallengeData2016``): the reader's label mapping, ``hafis prepare ade20k``, the published splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hafis.cli import main
from hafis.config import load_config
from hafis.data import build_sources, published
from hafis.data.ade20k import CLASS_NAMES, THING_CLASSES
from hafis.data.base import DataError
from hafis.data.splits import make_layout, read_split

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_reader_ignores_other_and_shifts_the_classes_down(ade20k_tree, mini):
    layout = make_layout("ade20k", ade20k_tree)
    assert (layout.train_pool(), layout.labelled_pool(), layout.val_ids()) == \
        (list(mini.ADE_TRAIN + mini.ADE_TRAIN_NO_GT), list(mini.ADE_TRAIN), list(mini.ADE_VAL))
    sample = layout.load(mini.ADE_TRAIN[1], "labelled")
    assert sample.image.shape == (mini.ADE_H, mini.ADE_W, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.mask, mini.ade_labels())
    np.testing.assert_array_equal(layout.load(mini.ADE_VAL[0], "val").mask, mini.ade_labels())
    assert layout.load(mini.ADE_TRAIN_NO_GT[0], "unlabelled").mask is None
    assert len(sample.boxes) == 0  # no instance annotations: the detector takes connected components
    assert (layout.num_classes, CLASS_NAMES[0], CLASS_NAMES[7], CLASS_NAMES[12], CLASS_NAMES[149]) == \
        (150, "wall", "bed", "person", "flag")
    assert len(THING_CLASSES) == 100 and 12 in THING_CLASSES and 0 not in THING_CLASSES  # person, not wall

    # the published lines name the same ids; the readers of a run
    config = load_config(None, ["data.dataset=ade20k", f"data.root={ade20k_tree}"])
    labelled, unlabelled, val = build_sources(config.data)
    assert (list(labelled.ids), list(unlabelled.ids), list(val.ids)) == \
        (list(mini.ADE_TRAIN), list(mini.ADE_TRAIN_NO_GT), list(mini.ADE_VAL))
    assert layout.normalize_id("images/training/ADE_train_00000002.jpg") == "ADE_train_00000002"

    # labels converted already (255) are refused, never shifted a second time
    mini.save_grey(ade20k_tree / "annotations" / "training" / f"{mini.ADE_TRAIN[0]}.png",
                   np.where(mini.ade_annotation() == 0, 255, mini.ade_annotation()))
    with pytest.raises(DataError, match=r"ADE_train_00000001.png: annotation value\(s\) 255 outside ADE20K's 0..150"):
        layout.load(mini.ADE_TRAIN[0], "labelled")


def test_prepare_checks_the_tree_and_draws_splits(ade20k_tree, mini, capsys):
    code, out, _ = run(capsys, "ade20k", ade20k_tree, "--labelled", "1", "--seed", "0")
    assert code == 0 and "ade20k tree checked, no problem found" in out
    folder = ade20k_tree / "splits" / "1"
    assert len(read_split(folder / "labelled.txt")) == 1 and len(read_split(folder / "unlabelled.txt")) == 2

    bad = ade20k_tree / "annotations" / "training" / f"{mini.ADE_TRAIN[0]}.png"
    raw = mini.ade_annotation()
    raw[0, 0], raw[0, 1] = 200, 151
    mini.save_grey(bad, raw)
    small = ade20k_tree / "annotations" / "validation" / f"{mini.ADE_VAL[0]}.png"
    mini.save_grey(small, np.zeros((4, 4), np.uint8))
    code, out, _ = run(capsys, "ade20k", ade20k_tree)
    assert code == 1 and "2 problem(s)" in out
    assert f"{bad}: annotation value(s) 151, 200 outside ADE20K's 0..150 (0 = other)" in out
    assert f"{small}: mask is 4x4 (WxH) but its image is 16x12" in out


def test_prepare_published_ade20k(ade20k_tree, mini, monkeypatch, capsys):
    # the shipped lists name 20,210 training images: the tiny tree has three, so every split is refused at once
    code, _, err = run(capsys, "ade20k", ade20k_tree, "--published", "unimatch")
    assert code == 2 and err.splitlines() == [
        f"hafis prepare: error: 20207 of the 20210 images of UniMatch V2's ade20k lists are missing, the first: "
        f"{ade20k_tree / 'images' / 'training' / 'ADE_train_00001609.jpg'}; nothing written"]

    # a stand-in with the tree's ids, in the release's line format
    line = "images/training/{0}.jpg annotations/training/{0}.png".format
    stand_in = {"ade20k/1_64/labeled.txt": [line(mini.ADE_TRAIN[1])],
                "ade20k/all/labeled.txt": [line(i) for i in mini.ADE_TRAIN + mini.ADE_TRAIN_NO_GT]}
    monkeypatch.setattr(published, "read_lists", lambda release: stand_in)
    code, out, err = run(capsys, "ade20k", ade20k_tree, "--published", "unimatch", "--split", "1_64")
    assert code == 0, err
    folder = ade20k_tree / "splits" / "unimatch" / "1_64"
    assert (folder / "labelled.txt").read_text() == line(mini.ADE_TRAIN[1]) + "\n"
    assert (folder / "unlabelled.txt").read_text() == f"{line(mini.ADE_TRAIN[0])}\n{line(mini.ADE_TRAIN_NO_GT[0])}\n"

    config = load_config(CONFIGS / "ade20k" / "1_64" / "unimatch_v2_weighting.yaml", [f"data.root={ade20k_tree}"])
    labelled, unlabelled, val = build_sources(config.data)
    assert (list(labelled.ids), list(unlabelled.ids), len(val)) == \
        ([mini.ADE_TRAIN[1]], [mini.ADE_TRAIN[0], mini.ADE_TRAIN_NO_GT[0]], 1)
    np.testing.assert_array_equal(labelled.load(0).mask, mini.ade_labels())
    assert main(["prepare", "ade20k", str(ade20k_tree), "--published", "unimatch", "--split", "1_64"]) == 0
