"""``hafis predict`` and the Predictor API: the masks equal evaluation's predictions, files of every kind."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hafis.cli import main
from hafis.config import load_config, to_dict
from hafis.data import build_sources
from hafis.data.io import read_label
from hafis.data.transforms import normalize, to_tensor_image
from hafis.data.voc import voc_palette
from hafis.engine.build import build_model
from hafis.engine.evaluation import eval_batches, eval_collate, predict
from hafis.engine.inference import Predictor, collect_inputs, select_weights

NUM_CLASSES = 4  # the tiny config's synthetic scenes: background and 3 shapes


def _random_segmenter(config, seed):
    """A tiny DeepLabV3+ whose classifier is scaled up, so its masks vary from pixel to pixel."""
    torch.manual_seed(seed)
    model = build_model(config, NUM_CLASSES)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)
        model.classifier.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    """``(config, checkpoint path, student, teacher)``: a mean-teacher-like checkpoint of two random networks; the
    student says class 1 everywhere."""
    config = load_config(tiny_config)
    student, teacher = _random_segmenter(config, 1), _random_segmenter(config, 2)
    with torch.no_grad():
        student.classifier.bias[1] = 1e3
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": teacher.state_dict(), "student": student.state_dict(), "iteration": 3,
                "framework": {"teacher": teacher.state_dict()}, "config": to_dict(config)}, path)
    return config, path, student, teacher


@pytest.fixture(scope="module")
def val_images(tmp_path_factory, tiny_config):
    """The tiny config's validation images saved as PNG files, plus two of other sizes (crops and a resize)."""
    folder = tmp_path_factory.mktemp("val")
    _, _, val = build_sources(load_config(tiny_config).data)
    images = [val.load(i).image for i in range(len(val))]
    images += [images[0][:24, :20], np.array(Image.fromarray(images[1]).resize((45, 37)))]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"v{i}.png")
    return folder, images


def _expected(model, images, mode="whole", window=None, batch_size=4):
    """Evaluation's predictions: its normalisation, its batches of one size (the val images come first and share
    theirs, as in evaluation's loader) and ``predict``."""
    out = []
    for start in range(0, len(images), batch_size):
        samples = [{"image": _eval_tensor(im), "mask": torch.zeros(im.shape[:2]), "index": 0}
                   for im in images[start:start + batch_size]]
        for batch, _ in eval_batches(eval_collate(samples)):
            out += list(predict(model, batch, mode, window).argmax(1).numpy())
    return out


def _eval_tensor(image):
    return normalize(to_tensor_image(image))


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_predict_equals_evaluation_pixel_for_pixel(tmp_path, capsys, tiny_config, run, val_images, mode):
    config, checkpoint, _, teacher = run
    folder, images = val_images
    out = tmp_path / "pred"
    args = ["--mode", mode] + (["--window", "16"] if mode == "sliding" else [])
    assert main(["predict", str(tiny_config), str(folder), "--checkpoint", str(checkpoint), "--out", str(out),
                 *args]) == 0
    expected = _expected(teacher, images[:4], mode, 16) + _expected(teacher, images[4:], mode, 16, batch_size=1)
    assert sum(len(np.unique(e)) for e in expected) > len(expected)  # the masks are not constant
    summary = json.loads((out / "predictions.json").read_text())
    assert [r["mask"] for r in summary["images"]] == [f"v{i}.png" for i in range(len(images))]
    for i, want in enumerate(expected):
        with Image.open(out / f"v{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[:3 * NUM_CLASSES] == voc_palette()[:3 * NUM_CLASSES]
        got = read_label(out / f"v{i}.png")
        np.testing.assert_array_equal(got, want)
        record = summary["images"][i]
        assert (record["height"], record["width"]) == want.shape
        names = summary["classes"]
        assert record["areas"] == {names[c]: int((want == c).sum()) for c in np.unique(want)}
    assert summary["classes"] == ["background", "disc", "square", "triangle"]


def test_network_choice(tmp_path, tiny_config, run, val_images):
    config, checkpoint, student, teacher = run
    folder, images = val_images
    masks = {}
    for network in ("student", "teacher", None):
        out = tmp_path / str(network)
        extra = ["--network", network] if network else []
        assert main(["predict", str(tiny_config), str(folder / "v0.png"), "--checkpoint", str(checkpoint),
                     "--out", str(out), *extra]) == 0
        masks[network] = read_label(out / "v0.png")
    np.testing.assert_array_equal(masks["student"], _expected(student, images[:1])[0])
    np.testing.assert_array_equal(masks["teacher"], _expected(teacher, images[:1])[0])
    np.testing.assert_array_equal(masks[None], masks["teacher"])  # the checkpoint's 'model', what eval reports
    assert (masks["student"] == 1).all() and not (masks["teacher"] == 1).all()


def test_teacher_of_u2pl_and_a_run_without_teacher():
    weights = {"classifier.weight": torch.ones(1)}
    u2pl = {"model": {}, "framework": {"teacher": {"segmenter.classifier.weight": torch.ones(1),
                                                   "rep_head.0.weight": torch.ones(1)}}}
    assert list(select_weights(u2pl, "teacher", "c.pt")) == ["classifier.weight"]
    from hafis.config import ConfigError

    with pytest.raises(ConfigError, match="has no teacher"):
        select_weights({"model": weights, "framework": {}, "config": {"train": {"framework": "unimatch"}}},
                       "teacher", "c.pt")


def test_api_on_pil_array_and_tensor_equals_the_cli(tmp_path, tiny_config, run, val_images):
    config, checkpoint, _, _ = run
    folder, images = val_images
    assert main(["predict", str(tiny_config), str(folder / "v5.png"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path), "--overlay", "--scores"]) == 0
    cli = read_label(tmp_path / "v5.png")
    predictor = Predictor.from_run(tiny_config, checkpoint)
    with Image.open(folder / "v5.png") as im:
        np.testing.assert_array_equal(predictor(im), cli)
    np.testing.assert_array_equal(predictor(images[5]), cli)
    tensor = torch.from_numpy(images[5]).permute(2, 0, 1)
    np.testing.assert_array_equal(predictor(tensor).numpy(), cli)
    assert predictor(torch.stack([tensor, tensor])).shape == (2, *cli.shape)
    with Image.open(tmp_path / "v5_overlay.jpg") as im:  # the image, its probability beside it, a legend below
        h, w = images[5].shape[:2]
        assert im.size[0] >= max(360, 2 * w) and im.size[1] > h
    # the score map: the top class's softmax probability x 255, independently from the logits
    logits = predictor.model(_eval_tensor(images[5])[None]).logits[0]
    top = (logits.softmax(0).amax(0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(read_label(tmp_path / "v5_scores.png"), top)


def test_exif_rotated_image_gives_the_displayed_orientation(tmp_path, tiny_config, run, val_images):
    config, checkpoint, _, _ = run
    _, images = val_images
    stored = images[5]  # 37 x 45
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    assert main(["predict", str(tiny_config), str(tmp_path / "turned.png"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "out")]) == 0
    displayed = np.ascontiguousarray(np.rot90(stored, k=-1))
    mask = read_label(tmp_path / "out" / "turned.png")
    assert mask.shape == displayed.shape[:2] == (45, 37)
    np.testing.assert_array_equal(mask, Predictor.from_run(tiny_config, checkpoint)(displayed))


def test_bad_files_are_named_and_skipped(tmp_path, capsys, tiny_config, run, val_images):
    config, checkpoint, _, _ = run
    _, images = val_images
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(images[0]).save(folder / "good.jpg")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    deep = (images[1][..., 0].astype(np.uint16) * 257)
    Image.fromarray(deep).save(folder / "sub" / "deep16.png")
    with Image.open(folder / "sub" / "deep16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    listing = tmp_path / "list.txt"
    listing.write_text("# a list\nin/good.jpg\nin/missing.png\n")
    out = tmp_path / "out"
    code = main(["predict", str(tiny_config), str(folder), str(listing), "--checkpoint", str(checkpoint),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0
    for bad in ("broken.jpg", "notes.txt", "missing.png"):
        assert sum(bad in line for line in err.splitlines()) == 1, err
    summary = json.loads((out / "predictions.json").read_text())
    assert sorted(r["mask"] for r in summary["images"]) == ["good-2.png", "good.png", "sub/deep16.png"]
    grey = np.repeat(images[1][..., :1], 3, axis=2)  # 16-bit values scaled back to the 8-bit ones
    np.testing.assert_array_equal(read_label(out / "sub" / "deep16.png"),
                                  Predictor.from_run(tiny_config, checkpoint)(grey))

    code = main(["predict", str(tiny_config), str(folder / "notes.txt"), str(folder / "sub" / "broken.jpg"),
                 "--checkpoint", str(checkpoint), "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2
    assert "none of the 2 input(s) could be read" in err and "broken.jpg" in err
    assert not (tmp_path / "none" / "predictions.json").exists()


def test_inputs_from_folders_lists_and_files(tmp_path):
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    for name in ("a/x.png", "a/deeper/y.JPG", "a/.hidden.png", "z.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "l.txt").write_text(f"z.png\n\n{tmp_path / 'a' / 'x.png'}\n")
    found, skipped = collect_inputs([tmp_path / "a", tmp_path / "l.txt", tmp_path / "nothere.png"])
    assert [(p.relative_to(tmp_path).as_posix(), n.as_posix()) for p, n in found] == [
        ("a/deeper/y.JPG", "deeper/y.JPG"), ("a/x.png", "x.png"), ("z.png", "z.png"), ("a/x.png", "x.png")]
    assert [s["error"] for s in skipped] == ["no such file or folder"]


def test_the_overlay_shows_the_mask_over_the_image_with_a_legend_of_its_classes():
    """A black image, classes 1 | 2 side by side: the blend is half each class's colour (VOC map: (128, 0, 0),
    (0, 128, 0)), the legend strip below shows both colours and not class 3's (128, 128, 0), which is absent."""
    from hafis.engine.inference import _overlay

    mask = np.zeros((40, 60), np.uint8)
    mask[:, :30], mask[:, 30:] = 1, 2
    with Image.open(io.BytesIO(_overlay(np.zeros((40, 60, 3), np.uint8), mask, voc_palette(),
                                        ["background", "disc", "square", "triangle"]))) as im:
        picture = np.asarray(im.convert("RGB")).astype(int)
    assert picture.shape[1] == 360 and picture.shape[0] > 40
    np.testing.assert_allclose(picture[20, 10], [64, 0, 0], atol=8)
    np.testing.assert_allclose(picture[20, 50], [0, 64, 0], atol=8)
    legend = picture[40:].reshape(-1, 3)

    def shown(rgb):
        return bool((np.abs(legend - rgb).max(axis=1) <= 12).sum() >= 20)

    assert shown([128, 0, 0]) and shown([0, 128, 0]) and not shown([128, 128, 0])
