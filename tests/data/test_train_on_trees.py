"""`hafis prepare` then a 2-iteration `hafis train` of the paper configs on each mini tree (tiny model, crop 32),
and the Transformer segmenter; `hafis eval` prints the per-class table with class names."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hafis.cli import main
from hafis.engine.run_log import read_metrics

CONFIGS = Path(__file__).parents[2] / "configs"
TINY = ["data.crop_size=32", "data.scale_range=[0.75,1.25]", "data.num_workers=0", "model.backbone=resnet_tiny",
        "model.pretrained=null", "model.feature_dim=32", "model.aspp_channels=32", "train.iterations=2",
        "train.eval_interval=2", "train.log_interval=1", "train.batch_size=2", "train.unlabelled_batch_size=2",
        "train.progress_bar=false", "train.tensorboard=false", "train.device=cpu", "eval.batch_size=2",
        "weighting.reliable=confidence", "weighting.samples_per_class=8"]


def train(config, root, tmp_path, *extra):
    run_dir = tmp_path / "run"
    code = main(["train", str(config), f"data.root={root}", f"output_dir={run_dir}", *TINY, *extra])
    assert code == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["iteration"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert len(evals) == 1 and math.isfinite(evals[0]["miou"])
    return run_dir, steps, evals[0]


def test_voc_prepare_train_and_eval_table(voc_tree, tmp_path, capsys):
    # the paper config reads its split files where `hafis prepare --published` writes them (a 2-image stand-in)
    assert main(["prepare", "voc", str(voc_tree), "--labelled", "2", "--out",
                 str(voc_tree / "splits/unimatch/classic/92")]) == 0
    run_dir, steps, result = train(CONFIGS / "voc/classic/92/unimatch_weighting.yaml", voc_tree, tmp_path)
    assert "weight_mean" in steps[0]
    assert len(result["iou"]) == 21 and list(result["iou_by_class"])[:2] == ["background", "aeroplane"]
    capsys.readouterr()
    checkpoint = run_dir / "checkpoints" / "ckpt_00000002.pt"
    config = CONFIGS / "voc/classic/92/unimatch_weighting.yaml"
    assert main(["eval", str(config), f"data.root={voc_tree}", "--checkpoint", str(checkpoint), *TINY]) == 0
    out = capsys.readouterr().out
    assert "whole evaluation on 2 images" in out
    assert any(line.split()[:1] == ["aeroplane"] for line in out.splitlines())
    assert json.loads(out.strip().splitlines()[-1])["miou"] == result["miou"]


def test_cityscapes_sliding_window_and_ohem(cityscapes_tree, tmp_path):
    assert main(["prepare", "cityscapes", str(cityscapes_tree), "--labelled", "1/16", "--out",
                 str(cityscapes_tree / "splits/unimatch/1_16")]) == 0
    _, steps, result = train(CONFIGS / "cityscapes/1_16/unimatch.yaml", cityscapes_tree, tmp_path,
                             "loss.ohem_min_kept=50")
    assert len(result["iou"]) == 19
    # road, sky, person and car are in the val mask, so they enter the mean; the rest are absent (None)
    present = [name for name, iou in result["iou_by_class"].items() if iou is not None]
    assert present == ["road", "sky", "person", "car"]


def test_coco_train(coco_tree, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "coco", str(coco_tree), "--labelled", "1/512", "--cache-dir", str(cache), "--out",
                 str(coco_tree / "splits/unimatch/1_512")]) == 0
    _, _, result = train(CONFIGS / "coco/1_512/unimatch.yaml", coco_tree, tmp_path, f"data.cache_dir={cache}",
                         "eval.window=24")
    assert len(result["iou"]) == 81


def test_folder_train(folder_tree, tmp_path):
    _, _, result = train(CONFIGS / "tiny/unimatch.yaml", folder_tree, tmp_path, "data.dataset=folder",
                         "weighting.enabled=true")
    assert list(result["iou_by_class"]) == ["background", "leaf", "stem"]


def test_segformer_on_voc(voc_tree, tmp_path):
    assert main(["prepare", "voc", str(voc_tree), "--labelled", "3", "--out",
                 str(voc_tree / "splits/unimatch/classic/92")]) == 0
    _, steps, result = train(CONFIGS / "voc/classic/92/segformer_unimatch_weighting.yaml", voc_tree, tmp_path,
                             "model.backbone=mit_tiny", "model.pretrained_path=null")
    assert "weight_mean" in steps[0]  # the weighting ran on the segmenter's 32-d features
    assert len(result["iou"]) == 21


def test_ade20k_unimatch_v2_as_released(ade20k_tree, tmp_path):
    # a 1-image stand-in for the published 1/64, where the paper config reads it (encoder frozen, as released)
    assert main(["prepare", "ade20k", str(ade20k_tree), "--labelled", "1", "--out",
                 str(ade20k_tree / "splits/unimatch/1_64")]) == 0
    run_dir, _, result = train(CONFIGS / "ade20k/1_64/unimatch_v2_weighting.yaml", ade20k_tree, tmp_path,
                               "data.crop_size=28", "model.backbone=dinov2_tiny", "model.feature_dim=16")
    assert len(result["iou"]) == 150 and list(result["iou_by_class"])[:2] == ["wall", "building"]
    # wall, building, person and flag are in the val mask; "other" (255) is ignored
    assert [n for n, iou in result["iou_by_class"].items() if iou is not None] == ["wall", "building", "person", "flag"]
