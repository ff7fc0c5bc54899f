"""One definition of "the same detector": hafis detect's recipe check and hafis compare's shared folders agree."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from hafis.config import DetectorConfig, load_config
from hafis.detection.identity import (
    INFERENCE_KEYS,
    PLACEMENT_KEYS,
    TRAINING_KEYS,
    detector_identity,
    detector_key,
    split_key,
    training_recipe,
)
from hafis.detection.step import detection_cache
from hafis.engine.compare.plan import parse_arm, plan_runs

DETECTOR = ["weighting.enabled=true", "weighting.reliable=detector", "detector.min_size=32", "detector.max_size=48"]


def _source(ids=("a", "b", "c")):
    image = SimpleNamespace(image=np.zeros((24, 40, 3), np.uint8))
    return SimpleNamespace(ids=list(ids), class_names=["bg", "thing"], thing_classes=[1], load=lambda i: image)


def test_every_detector_key_is_classified_once():
    fields = [f.name for f in dataclasses.fields(DetectorConfig)]
    groups = [*TRAINING_KEYS, *INFERENCE_KEYS, *PLACEMENT_KEYS, "component_classes"]
    assert sorted(groups) == sorted(fields) and len(set(groups)) == len(groups)


def test_the_stored_recipe_keeps_its_keys():
    """A ``detector.pt`` written before still matches: the recipe has the same keys and values."""
    config = load_config(None, [*DETECTOR, "detector.arch=tiny", "detector.iterations=7", "seed=3"])
    source = _source()
    recipe = training_recipe(config, source)
    labelled = split_key(["a", "b", "c"], {
        "data": {k: v for k, v in dataclasses.asdict(config.data).items()
                 if k not in ("crop_size", "scale_range", "num_workers", "cache_dir")},
        "split": "labelled", "classes": ["bg", "thing"], "thing_classes": [1]})
    assert recipe == {"arch": "tiny", "iterations": 7, "batch_size": 4, "lr": 5e-5, "weight_decay": 0.0,
                      "boxes": "auto", "component_min_area": 0, "min_size": 32, "max_size": 48,
                      "backbone_weights": None, "seed": 3, "labelled": labelled}
    # null sizes: the first labelled image's (24 x 40)
    free = load_config(None, ["weighting.enabled=true", "weighting.reliable=detector"])
    assert (training_recipe(free, source)["min_size"], training_recipe(free, source)["max_size"]) == (24, 40)
    combined = load_config(None, [*DETECTOR, "detector.boxes=combined", "detector.component_classes=[pole]"])
    assert training_recipe(combined, source)["component_classes"] == ["pole"]


def test_arms_that_differ_in_the_score_threshold_share_one_detector(tmp_path, tiny_config):
    """``hafis detect`` reuses the detector of another score threshold (same recipe) and keeps a cache per threshold;
    ``hafis compare`` gives both arms one detector folder; a training key moves both."""
    a = load_config(tiny_config, DETECTOR)
    b = load_config(tiny_config, [*DETECTOR, "detector.score_threshold=0.5"])
    source = _source()
    assert detector_identity(a) == detector_identity(b) and detector_key(a) == detector_key(b)
    assert training_recipe(a, source) == training_recipe(b, source)
    assert detection_cache(a, source, "0" * 64).path != detection_cache(b, source, "0" * 64).path
    longer = load_config(tiny_config, [*DETECTOR, "detector.iterations=11"])
    assert detector_key(longer) != detector_key(a) and training_recipe(longer, source) != training_recipe(a, source)

    arms = [parse_arm("low: " + " ".join(DETECTOR)), parse_arm("high: " + " ".join(DETECTOR) +
                                                                " detector.score_threshold=0.5"),
            parse_arm("long: " + " ".join(DETECTOR) + " detector.iterations=11")]
    specs = plan_runs(tiny_config, arms, [0], [], tmp_path)
    folders = [s.detector_dir for s in specs]
    assert folders[0] == folders[1] != folders[2]


def test_compare_runs_detect_once_per_inference_setting_of_a_shared_folder(tmp_path, tiny_config):
    """Within one detector folder, ``hafis detect`` runs for each distinct score threshold, one after the other (the
    first trains the detector, the next reuses it); an arm with the same settings adds no run."""
    from hafis.engine.compare.pool import Comparison

    arms = [parse_arm("low: " + " ".join(DETECTOR)), parse_arm("low2: " + " ".join(DETECTOR) + " weighting.k=3"),
            parse_arm("high: " + " ".join(DETECTOR) + " detector.score_threshold=0.5")]
    comparison = Comparison(tiny_config, arms, [0], [], tmp_path, None, "cmd", log=lambda m: None)
    calls = []

    def fake(args, log_path, env, every=None):
        calls.append((args[0], log_path.parent, args))
        return 0

    comparison._subprocess = fake
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert comparison._detect_all(comparison.specs, pool, {}) == {}
    folder = comparison.specs[0].detector_dir
    assert [(c[0], c[1]) for c in calls] == [("detect", folder)] * 2
    assert "detector.score_threshold=0.5" in calls[1][2] and "detector.score_threshold=0.5" not in calls[0][2]
