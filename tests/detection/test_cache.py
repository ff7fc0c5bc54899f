import numpy as np
import pytest
import torch

from hafis.detection.cache import BoxMaskProvider, DetectionCache, DetectionCacheError, Detections, box_quality
from hafis.detection.identity import split_key

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


def test_box_quality_counts_same_class_matches_at_iou_half():
    from types import SimpleNamespace

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

