"""The demo's part of ``report.md``, after the comparison's tables: per-class IoU, pseudo-label quality over
training, each framework without / with the weighting, the detector, the pictures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hafis.engine.compare.runs import RunData

from .detector import DETECTOR_RUN, DetectorInfo

#: unlabelled images whose pseudo-labels are checked against their hidden ground truth at every evaluation
#: (``eval.diagnostics_images``)
NUM_PROBE_IMAGES = 64


@dataclass
class RunRecord:
    """One demo run: its evaluations (iteration, mIoU, pseudo-label quality), final per-class IoU, wall time."""

    label: str
    iterations: list[int] = field(default_factory=list)
    miou: list[float] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)
    #: class name -> final IoU
    final_iou: dict = field(default_factory=dict)
    best_miou: float = float("nan")
    seconds: float = 0.0


def run_record(run: RunData) -> RunRecord:
    """A run's record from its metrics.jsonl (the trainer logs the diagnostics with every evaluation)."""
    final = run.final
    if final is None:
        return RunRecord(run.arm)
    evals = run.evals
    return RunRecord(run.arm, [e["iteration"] for e in evals], [e["miou"] for e in evals],
                     [e.get("diagnostics") or {} for e in evals], dict(final.get("iou_by_class") or {}),
                     final["best_miou"], run.wall_s or 0.0)


def pct(v: Optional[float]) -> str:
    """A share as a percentage with one decimal; ``-`` for a missing or NaN value."""
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def num(v: Optional[float]) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


#: what a one-seed difference is worth, said wherever the demo shows one
ONE_SEED = ("one seed: a run's final mIoU moves by several points with the seed alone (up to 7 on the garments, "
            "benchmarks/results/realistic.md), so a one-seed difference is no evidence either way; the realistic "
            "benchmark measures it over seeds, with intervals")

DATA_NAMES = {"garments": "Fashion-MNIST garments on real photographs, ImageNet-pretrained EfficientNet-Lite0"}


def demo_report(records: list[RunRecord], config_path: Path, frameworks: Optional[Sequence[str]] = None,
                detector: Optional[DetectorInfo] = None) -> str:
    """The demo's sections of ``report.md`` (markdown, to follow the comparison's)."""
    data = DATA_NAMES.get(config_path.stem.split("_")[0], "built-in synthetic scenes")
    class_names = list(records[0].final_iou)
    lines = ["", "## Demo", "",
             f"Config: `{config_path.name}` ({data}), same labelled subset for every run; {ONE_SEED}.", "",
             "Per-class IoU (final):", "", "| method | " + " | ".join(class_names) + " |",
             "|---|" + "---|" * len(class_names)]
    for r in records:
        lines.append(f"| {r.label} | " + " | ".join(pct(r.final_iou.get(c)) for c in class_names) + " |")
    lines += ["", f"Pseudo-labels on {NUM_PROBE_IMAGES} unlabelled images against their hidden ground truth "
              "(first evaluation → last):", "",
              "| method | wrong pixels % | confident share % | wrong among confident % | mean W right | mean W wrong "
              "| W right / wrong within a class (last) |",
              "|---|---|---|---|---|---|---|"]
    for r in records[1:]:
        first, last = r.quality[0], r.quality[-1]
        w_r = f"{num(first['weight_right'])} → {num(last['weight_right'])}" if "weight_right" in last else "-"
        w_w = f"{num(first['weight_wrong'])} → {num(last['weight_wrong'])}" if "weight_wrong" in last else "-"
        w_c = (f"{num(last['weight_right_within_class'])} / {num(last['weight_wrong_within_class'])}"
               if "weight_right_within_class" in last else "-")
        lines.append(f"| {r.label} | {pct(first['pseudo_error'])} → {pct(last['pseudo_error'])} | "
                     f"{pct(first['confident_share'])} → {pct(last['confident_share'])} | "
                     f"{pct(first['confident_error'])} → {pct(last['confident_error'])} | {w_r} | {w_w} | {w_c} |")
    if frameworks:
        lines += frameworks_table(records, frameworks)
    lines += ["", "Pictures: `pseudo_labels.png` (image, hidden ground truth, pseudo-label, confidence, reliable mask, "
              "weight map of unlabelled images, from the first weighting run).", ""]
    lines += detector_report_lines(detector, records)
    return "\n".join(lines)


def frameworks_table(records: list[RunRecord], frameworks: Sequence[str]) -> list[str]:
    """Each framework without / with the weighting (records: supervised, then off / on pairs in order)."""
    lines = ["", "Each framework without and with the weighting (paper form: W = s/k, the framework's own "
             f"normaliser); {ONE_SEED}:", "",
             "| framework | mIoU off | mIoU on | Δ | best off | best on | Δ best | wall time off / on (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, name in enumerate(frameworks):
        off, on = records[1 + 2 * k], records[2 + 2 * k]
        lines.append(f"| {name} | {pct(off.miou[-1])} | {pct(on.miou[-1])} | "
                     f"{100 * (on.miou[-1] - off.miou[-1]):+.2f} | {pct(off.best_miou)} | {pct(on.best_miou)} | "
                     f"{100 * (on.best_miou - off.best_miou):+.2f} | {off.seconds:.0f} / {on.seconds:.0f} |")
    lines.append(f"| (supervised only) | {pct(records[0].miou[-1])} | | | {pct(records[0].best_miou)} | | | "
                 f"{records[0].seconds:.0f} |")
    return lines


def detector_report_lines(info: Optional[DetectorInfo], records) -> list[str]:
    """The report's detector section: the detector, and the reliable pixels of every weighting run."""
    if info is None:
        return []
    s, b = info.summary, info.boxes
    lines = ["", "## Detector-verified prototypes", "",
             f"Detector: `{info.arch}` Faster R-CNN trained on the labelled images only ({info.iterations} steps), "
             f"then run once over the {s['images']} unlabelled images; detector training + detection "
             f"{info.seconds:.0f} s. Detections with score >= tau_det {info.tau_det:g}: {s['kept']} on "
             f"{s['images_with_kept']} images. Against the hidden ground-truth boxes of {b.get('images')} of them "
             f"(IoU >= 0.5, same class): box precision {pct(b.get('precision'))} %, box recall "
             f"{pct(b.get('recall'))} % ({b.get('detections')} detections, {b.get('gt_boxes')} objects).", "",
             "Unlabelled pixels that fed the prototype bank, on the probe images against their hidden ground truth "
             "(first evaluation → last):", "",
             "| run | reliable rule | reliable share of pixels % | wrong among reliable % |", "|---|---|---|---|"]
    for r in records:
        q = r.quality
        if not q or "weight_right" not in q[-1]:
            continue
        rule = "confidence + detector" if r.label == DETECTOR_RUN[0] else "confidence"
        lines.append(f"| {r.label} | {rule} | {pct(q[0]['reliable_share'])} → {pct(q[-1]['reliable_share'])} | "
                     f"{pct(q[0]['reliable_error'])} → {pct(q[-1]['reliable_error'])} |")
    lines += ["", "`detections.png`: unlabelled images with their detections (solid boxes count, dashed ones are "
              "below tau_det), the pseudo-label, and the pixels judged reliable by confidence alone and by "
              "confidence + a same-class box (background is never reliable under the detector rule: "
              "`weighting.stuff: exclude`, as the authors' code).", ""]
    return lines
