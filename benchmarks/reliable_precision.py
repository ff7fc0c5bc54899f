"""How clean are the unlabelled pixels that feed the prototype bank: confidence alone vs confidence ⊕ detector.

The paper's claim (docs/method.md, 1): pixels the segmenter is confident about *and* a same-class detection box
covers are cleaner prototype material than confident pixels alone. This script measures it on the built-in synthetic
scenes (the demo's data by default), at a few points of one UniMatch training run:

1. ``hafis detect``'s step: a detector trained on the labelled images only, its detections over the unlabelled
   images cached (``--out``/detector);
2. plain UniMatch training (the measurement needs the segmenter's pseudo-labels only, so the weighting is off);
3. at each point, the whole unlabelled probe images are pseudo-labelled and every rule's reliable set is compared
   with the hidden ground truth:

   - precision = share of reliable pixels whose pseudo-label is right;
   - coverage = reliable pixels / all labelled (non-ignore) pixels;
   - object recall = reliable pixels with the right object-class pseudo-label / object-class pixels of the ground
     truth (how much correct object material the bank can draw on).

Rules: confidence ≥ τ_seg (all classes, and object classes only: the fair comparison, since the detector rule
excludes background by default), confidence ⊕ detector at τ_det = 0.95 (the authors') and lower τ_det, with
``stuff: exclude`` and ``stuff: confidence``, and confidence ⊕ ground-truth boxes (a perfect detector, the
rule's upper bound).

    python benchmarks/reliable_precision.py                        # ~3 CPU-minutes
    python benchmarks/reliable_precision.py --iterations 800 --points 100,200,400,800
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from hafis.config import load_config
from hafis.detection.cache import BoxMaskProvider, Detections, box_quality
from hafis.detection.step import run_detect
from hafis.engine.diagnostics import load_images
from hafis.engine.trainer import Trainer
from hafis.weighting import confident_pixels, detector_reliable

CONFIG = Path(__file__).resolve().parents[1] / "src" / "hafis" / "demo" / "configs" / "demo_quick.yaml"


def rules(conf, pseudo, valid, things, tau_seg, det_masks: dict, gt_mask):
    """name -> reliable mask ``(B, H, W)`` for every rule measured."""
    is_thing = torch.zeros(gt_mask.shape[1], dtype=torch.bool)
    is_thing[list(things)] = True
    confident = confident_pixels(conf, pseudo, tau_seg) & valid
    out = {"confidence (all classes)": confident,
           "confidence (object classes only)": confident & is_thing[pseudo.clamp(0, len(is_thing) - 1)]}
    for tau, masks in det_masks.items():
        out[f"conf + detector, tau_det {tau:g}"] = detector_reliable(conf, pseudo, valid, masks, things, tau_seg)
    top = max(det_masks)
    out[f"conf + detector, tau_det {top:g}, stuff: confidence"] = detector_reliable(
        conf, pseudo, valid, det_masks[top], things, tau_seg, stuff="confidence")
    out["conf + ground-truth boxes (perfect detector)"] = detector_reliable(conf, pseudo, valid, gt_mask, things,
                                                                           tau_seg)
    return out


@torch.no_grad()
def measure(trainer: Trainer, images, gt, det_masks, gt_masks, things, tau_seg, batch_size=32) -> dict:
    sums: dict[str, list[float]] = {}
    valid_total = thing_total = 0.0
    for s in range(0, len(images), batch_size):
        out = trainer.framework.pseudo_labels(images[s:s + batch_size].to(trainer.device))
        conf, pseudo = out["confidence"].cpu(), out["pseudo"].cpu()
        target = gt[s:s + batch_size]
        valid = target != 255
        thing_gt = valid & torch.isin(target, torch.tensor(list(things)))
        valid_total += float(valid.sum())
        thing_total += float(thing_gt.sum())
        right = pseudo == target
        for name, mask in rules(conf, pseudo, valid, things, tau_seg,
                                {t: m[s:s + batch_size] for t, m in det_masks.items()},
                                gt_masks[s:s + batch_size]).items():
            acc = sums.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(mask.sum())
            acc[1] += float((mask & right).sum())
            acc[2] += float((mask & right & thing_gt).sum())
    return {name: {"precision": r / max(n, 1), "coverage": n / max(valid_total, 1),
                   "object_recall": th / max(thing_total, 1), "pixels": int(n)}
            for name, (n, r, th) in sums.items()}


def gt_box_masks(source, indices, num_classes) -> torch.Tensor:
    per_image = []
    for i in indices:
        s = source.load(i)
        per_image.append({"boxes": s.boxes, "labels": s.box_labels, "scores": [1.0] * len(s.boxes),
                          "size": s.image.shape[:2]})
    det = Detections.concatenate([str(i) for i in indices], per_image)
    provider = BoxMaskProvider(det, num_classes, 0.5)
    return provider.batch(range(len(indices)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--points", default="50,100,200,400", help="iterations at which to measure")
    p.add_argument("--probe", type=int, default=200, help="unlabelled images measured")
    p.add_argument("--tau-det", default="0.95,0.8,0.5", help="detector score thresholds (the first is the main)")
    p.add_argument("--out", default="bench_out/reliable_precision")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. detector.iterations=400")
    args = p.parse_args(argv)
    points = sorted(int(v) for v in args.points.split(","))
    taus = [float(v) for v in args.tau_det.split(",")]
    out = Path(args.out)
    step = min(points + [b - a for a, b in itertools.pairwise(points)])
    config = load_config(args.config, [
        "train.framework=unimatch", "weighting.enabled=false", f"train.iterations={args.iterations}",
        f"train.eval_interval={step}", "train.progress_bar=false", "train.tensorboard=false",
        f"output_dir={out}/runs/{{name}}", f"detector.output_dir={out}/detector", *args.overrides])

    t0 = time.perf_counter()
    detections, cache = run_detect(config, progress=False, log=lambda m: print(m, file=sys.stderr))
    detect_seconds = time.perf_counter() - t0

    trainer = Trainer(config)
    source = trainer.unlabelled_source
    things = tuple(int(c) for c in source.thing_classes)
    n = min(args.probe, len(source))
    images, gt = load_images(source, range(n))
    provider = {tau: BoxMaskProvider(detections, trainer.num_classes, tau) for tau in taus}
    det_masks = {tau: prov.batch(range(n)) for tau, prov in provider.items()}
    gt_masks = gt_box_masks(source, range(n), trainer.num_classes)
    boxes_by_tau = {tau: box_quality(detections, source, range(n), tau) for tau in taus}

    results: dict[int, dict] = {}
    miou: dict[int, float] = {}

    def on_eval(tr, iteration, result):
        if iteration in points:
            results[iteration] = measure(tr, images, gt, det_masks, gt_masks, things, config.weighting.tau_seg)
            miou[iteration] = result.miou

    trainer.on_eval = on_eval
    t1 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t1

    names = list(next(iter(results.values())))
    lines = [f"Reliable unlabelled pixels on {n} synthetic scenes ({config.data.synthetic.image_size} px, "
             f"{config.data.synthetic.num_labelled} labelled images), UniMatch, tau_seg {config.weighting.tau_seg:g}. "
             f"Cells: precision % / coverage % / object recall %.", "",
             "| rule | " + " | ".join(f"it {it} (mIoU {100 * miou[it]:.1f})" for it in points) + " |",
             "|---|" + "---|" * len(points)]
    for name in names:
        cells = [f"{100 * results[it][name]['precision']:.1f} / {100 * results[it][name]['coverage']:.2f} / "
                 f"{100 * results[it][name]['object_recall']:.2f}" for it in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Detector ({config.detector.arch}, {config.detector.iterations} steps, lr {config.detector.lr:g}) "
              f"boxes on the same images (IoU >= 0.5, same class):", "",
              "| tau_det | detections | ground-truth boxes | box precision % | box recall % |", "|---|---|---|---|---|"]
    for tau, q in boxes_by_tau.items():
        lines.append(f"| {tau:g} | {q['detections']} | {q['gt_boxes']} | {100 * q['precision']:.1f} | "
                     f"{100 * q['recall']:.1f} |")
    lines += ["", f"Detector training + detection {detect_seconds:.0f} s, segmenter training {train_seconds:.0f} s."]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"points": points, "miou": miou, "results": results,
                                                  "detector_boxes": {str(k): v for k, v in boxes_by_tau.items()}},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
