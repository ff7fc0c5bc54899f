"""Tune the realistic benchmark's detector on its own metrics: box precision and recall on held-out labelled images.

    python benchmarks/detector_tuning.py                          # 1/32 split, lr 1e-3, up to 200 epochs
    python benchmarks/detector_tuning.py --labelled 250 --epochs 40
    python benchmarks/detector_tuning.py --evaluate bench_out/realistic/1_32/detectors/*/detector.pt

The detector of the weighting arms is trained on the labelled images only, so it is tuned on them only: the fixed
labelled split of the benchmark (``benchmarks/realistic.py``) is cut into a training part and ``--held-out`` images
(a seeded draw); one detector per learning rate (``--lrs``) is trained on the training part, and every ``--every``
epochs its boxes with score >= ``tau_det`` on the held-out images are matched to their ground-truth boxes (same
class, IoU >= 0.5, greedy by score). Reported per (lr, epoch): box precision, box recall, and the share of held-out
images with a kept box. Never mIoU: the segmentation arms play no part in the choice. An epoch is
``labelled / batch`` steps, so a schedule chosen in epochs scales with the labelled set.

``--evaluate`` instead reports, for detectors the benchmark trained (``hafis detect`` of the weighting arms), the
boxes they keep at ``tau_det`` on the split's unlabelled images and their precision and recall against those images'
ground truth: how much of the unlabelled set the detector can verify.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import footer, header, table
from torchvision.ops import box_iou

from hafis.config import load_config
from hafis.data import build_sources
from hafis.data.base import SegmentationSource
from hafis.detection.infer import detect
from hafis.detection.networks import build_detector
from hafis.detection.step import component_classes, detected_classes
from hafis.detection.train import DetectionDataset, sample_boxes, train_detector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import realistic  # noqa: E402


class Part(SegmentationSource):
    """Some images of a source (the training or the held-out part of the labelled split)."""

    def __init__(self, source: SegmentationSource, indices: list[int]):
        self.source, self.indices = source, indices
        self.class_names, self.thing_classes = source.class_names, source.thing_classes

    @property
    def ids(self):
        return [self.source.ids[i] for i in self.indices]

    def load(self, index: int):
        return self.source.load(self.indices[index])


def match(pred: dict, boxes: np.ndarray, labels: np.ndarray, tau: float) -> tuple[int, int, int]:
    """(true positives, kept predictions, ground-truth boxes) of one image: greedy by score, same class, IoU >= 0.5."""
    keep = pred["scores"] >= tau
    p_boxes, p_labels = torch.from_numpy(pred["boxes"][keep]), pred["labels"][keep]
    if len(p_boxes) == 0 or len(boxes) == 0:
        return 0, int(keep.sum()), len(boxes)
    iou = box_iou(p_boxes, torch.from_numpy(np.asarray(boxes, np.float32))).numpy()
    iou[p_labels[:, None] != np.asarray(labels)[None, :]] = 0
    free, tp = np.ones(len(boxes), bool), 0
    for row in iou:  # predictions come highest score first; each ground-truth box matches once
        j = int(np.argmax(np.where(free, row, -1)))
        if free[j] and row[j] >= 0.5:
            free[j] = False
            tp += 1
    return tp, len(p_boxes), len(boxes)


def score(preds: list[dict], truth: list[tuple], tau: float) -> tuple[float, float, float, int]:
    """(box precision, box recall, share of images with a kept box, boxes kept) of detections against truth."""
    counts = np.array([match(pr, b, lab, tau) for pr, (b, lab) in zip(preds, truth, strict=True)])
    tp, kept, gt = counts.sum(0)
    with_box = float(np.mean([(pr["scores"] >= tau).any() for pr in preds]))
    return tp / max(kept, 1), tp / max(gt, 1), with_box, int(kept)


def evaluate(paths: list[Path], config, unlabelled: SegmentationSource, things: list[int], tau: float) -> None:
    """Boxes kept at ``tau`` on the unlabelled images by each trained detector, and their precision / recall."""
    from hafis.detection.step import load_detector

    samples = [unlabelled.load(i) for i in range(len(unlabelled))]
    truth = [sample_boxes(s, things, config.detector.boxes) for s in samples]
    with_truth = float(np.mean([len(b) > 0 for b, _ in truth]))
    print(f"- {len(samples)} unlabelled images, {with_truth:.0%} with a garment, "
          f"{sum(len(b) for b, _ in truth)} ground-truth boxes; tau_det {tau}\n", flush=True)
    rows = []
    for path in paths:
        model, state = load_detector(path, config, things)
        preds = []
        for start in range(0, len(samples), 50):
            preds += detect(model, [s.image for s in samples[start:start + 50]], things)
        precision, recall, with_box, kept = score(preds, truth, tau)
        rows.append([str(path), state["recipe"].get("seed", "?"), kept, with_box, precision, recall])
    table(["detector", "seed", "boxes kept", "unlabelled images with a box", "box precision", "box recall"], rows)
    if len(rows) > 1:
        columns = list(zip(*rows, strict=True))[2:]
        print(f"\n- mean ± std over the {len(rows)} detectors: " + ", ".join(
            f"{name} {statistics.mean(v):.{p}f} ± {statistics.stdev(v):.{p}f}" for name, v, p in
            zip(("boxes kept", "images with a box", "box precision", "box recall"), columns, (0, 2, 2, 2),
                strict=True)))
    footer()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelled", type=int, default=realistic.SPLITS["1_32"])
    p.add_argument("--held-out", type=int, default=12)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    p.add_argument("--arch", default=None, help="detector.arch (default: the benchmark config's)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="evaluate every this many epochs")
    p.add_argument("--tau", type=float, default=0.95, help="weighting.tau_det")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evaluate", type=Path, nargs="+", default=None, metavar="DETECTOR_PT",
                   help="evaluate these trained detectors on the split's unlabelled images instead of tuning")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header("Detector of the realistic benchmark: box precision / recall on "
           + ("the unlabelled images" if args.evaluate else "held-out labelled images"))
    sched = realistic.schedule(args.labelled, 20)
    config = load_config(realistic.CONFIG, realistic.split_overrides(args.labelled, sched).split())
    labelled, unlabelled, _ = build_sources(config.data)
    things = detected_classes(config, labelled)
    if args.evaluate:
        evaluate(args.evaluate, config, unlabelled, things, args.tau)
        return
    order = np.random.default_rng([args.seed, 11]).permutation(len(labelled))
    held = Part(labelled, sorted(order[:args.held_out].tolist()))
    train = Part(labelled, sorted(order[args.held_out:].tolist()))
    truth = [sample_boxes(held.load(i), things, config.detector.boxes) for i in range(len(held))]
    images = [held.load(i).image for i in range(len(held))]
    d = config.detector
    if args.arch:
        d.arch = args.arch
    steps_per_epoch = max(1, math.ceil(len(train) / d.batch_size))
    print(f"- {len(labelled)} labelled images (split seed {realistic.SPLIT_SEED}): {len(train)} to train, "
          f"{len(held)} held out with {sum(len(b) for b, _ in truth)} boxes; {d.arch} detector, batch "
          f"{d.batch_size}, Adam; an epoch = {steps_per_epoch} steps; tau_det {args.tau}\n", flush=True)
    rows = []
    for lr in args.lrs:
        torch.manual_seed(args.seed)
        h, w = images[0].shape[:2]
        model = build_detector(d.arch, len(things), min_size=min(h, w), max_size=max(h, w),
                               score_threshold=d.score_threshold, detections_per_image=d.detections_per_image)
        dataset = DetectionDataset(train, things, d.boxes, d.component_min_area, seed=args.seed,
                                   component_classes=component_classes(config, labelled))
        start = time.perf_counter()
        losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            if (step + 1) % (args.every * steps_per_epoch):
                return
            preds = detect(model, images, things)
            precision, recall, with_box, kept = score(preds, truth, args.tau)
            recall_half = score(preds, truth, 0.5)[1]  # localisation and class at a lax score: what tau costs
            epoch = (step + 1) // steps_per_epoch
            row = [f"{lr:g}", epoch, step + 1, precision, recall, with_box, kept, recall_half,
                   float(np.mean(losses[-steps_per_epoch:])), time.perf_counter() - start]
            rows.append(row)
            print(f"lr {lr:g} epoch {epoch}: precision {precision:.3f} recall {recall:.3f} images with a box "
                  f"{with_box:.2f} ({kept} boxes kept); recall at score 0.5 {recall_half:.3f}; loss {row[8]:.3f} "
                  f"({row[9]:.0f} s)", flush=True)

        train_detector(model, dataset, args.epochs * steps_per_epoch, batch_size=d.batch_size, lr=lr,
                       weight_decay=d.weight_decay, seed=args.seed, on_step=on_step)
    print()
    table(["lr", "epoch", "steps", "box precision", "box recall", "held-out images with a box", "boxes kept",
           "box recall at score 0.5", "loss (last epoch)", "s"], rows)
    footer()


if __name__ == "__main__":
    main()
