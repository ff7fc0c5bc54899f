"""The demo's report: ``report.md`` (tables of mIoU and pseudo-label quality) and its curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from hafis.files import atomic_write

from .detector import DETECTOR_RUN, DetectorInfo

#: unlabelled images whose pseudo-labels are checked against their hidden ground truth at every evaluation
NUM_PROBE_IMAGES = 64


@dataclass
class RunRecord:
    """One demo run: its evaluations (iteration, mIoU, pseudo-label quality), final per-class IoU, wall time."""

    label: str
    iterations: list[int] = field(default_factory=list)
    miou: list[float] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)
    final_iou: list[Optional[float]] = field(default_factory=list)
    best_miou: float = float("nan")
    seconds: float = 0.0


def pct(v: Optional[float]) -> str:
    """A share as a percentage with one decimal; ``-`` for a missing or NaN value."""
    return "-" if v is None or v != v else f"{100 * v:.1f}"


#: what a one-seed difference is worth, said wherever the demo shows one
ONE_SEED = ("one seed: a run's final mIoU moves by several points with the seed alone (up to 7 on the garments, "
            "benchmarks/results/realistic.md), so a one-seed difference is no evidence either way; the realistic "
            "benchmark measures it over seeds, with intervals")

DATA_NAMES = {"garments": "Fashion-MNIST garments on real photographs, ImageNet-pretrained EfficientNet-Lite0"}


def write_report(path: Path, records: list[RunRecord], class_names: list[str], quick: bool, seconds: float,
                 config_path: Path, frameworks: Optional[Sequence[str]] = None) -> str:
    data = DATA_NAMES.get(config_path.stem.split("_")[0], "built-in synthetic scenes")
    lines = [f"# hafis demo ({'quick' if quick else 'full'})", "",
             f"Config: `{config_path.name}` ({data}), one seed, same labelled subset for every run. "
             f"Total wall time {seconds:.0f} s.", "",
             "| method | final mIoU | best mIoU | wall time (s) |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.label} | {pct(r.miou[-1])} | {pct(r.best_miou)} | {r.seconds:.0f} |")
    lines += ["", "Per-class IoU (final):", "", "| method | " + " | ".join(class_names) + " |",
              "|---|" + "---|" * len(class_names)]
    for r in records:
        lines.append(f"| {r.label} | " + " | ".join(pct(v) for v in r.final_iou) + " |")
    lines += ["", f"Pseudo-labels on {NUM_PROBE_IMAGES} unlabelled images against their hidden ground truth "
              "(first evaluation → last):", "",
              "| method | wrong pixels % | confident share % | wrong among confident % | mean W right | mean W wrong "
              "| W right / wrong within a class (last) |",
              "|---|---|---|---|---|---|---|"]
    for r in records[1:]:
        first, last = r.quality[0], r.quality[-1]
        w_r = f"{first['weight_right']:.3f} → {last['weight_right']:.3f}" if "weight_right" in last else "-"
        w_w = f"{first['weight_wrong']:.3f} → {last['weight_wrong']:.3f}" if "weight_wrong" in last else "-"
        w_c = (f"{last['weight_right_within_class']:.3f} / {last['weight_wrong_within_class']:.3f}"
               if "weight_right_within_class" in last else "-")
        lines.append(f"| {r.label} | {pct(first['pseudo_error'])} → {pct(last['pseudo_error'])} | "
                     f"{pct(first['confident_share'])} → {pct(last['confident_share'])} | "
                     f"{pct(first['confident_error'])} → {pct(last['confident_error'])} | {w_r} | {w_w} | {w_c} |")
    if frameworks:
        lines += frameworks_table(records, frameworks)
    base = records[1].miou[-1] if len(records) > 1 else None
    if base is not None and not frameworks:
        lines += ["", f"Effect of the weighting on final mIoU, against plain UniMatch ({ONE_SEED}):", ""]
        for r in records[2:]:
            lines.append(f"- {r.label}: {100 * (r.miou[-1] - base):+.2f} points "
                         f"(best epoch: {100 * (r.best_miou - records[1].best_miou):+.2f})")
    lines += ["", "Pictures: `miou.png` (val mIoU over iterations), `pseudo_labels_quality.png` (wrong pseudo-label "
              "share and mean W of right / wrong pixels over training), `pseudo_labels.png` (image, hidden ground "
              "truth, pseudo-label, reliable mask, weight map of unlabelled images, from the first weighting run).", ""]
    text = "\n".join(lines)
    atomic_write(path, text)
    return text


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


def plot_curves(records: list[RunRecord], miou_path: Path, quality_path: Path) -> None:
    """Val mIoU of every run, and wrong pseudo-labels / mean W of right and wrong pixels, over iterations."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for r in records:
        ax.plot(r.iterations, [100 * v for v in r.miou], marker="o", ms=3, label=r.label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(miou_path, lambda fh: fig.savefig(fh, format="png", dpi=120))

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for r in records[1:]:
        axes[0].plot(r.iterations, [100 * q["pseudo_error"] for q in r.quality], label=f"{r.label}: all")
        axes[0].plot(r.iterations, [100 * q["reliable_error"] for q in r.quality], ls="--",
                     label=f"{r.label}: reliable")
        if "weight_right" in r.quality[0]:
            axes[1].plot(r.iterations, [q["weight_right"] for q in r.quality], label=f"{r.label}: right")
            axes[1].plot(r.iterations, [q["weight_wrong"] for q in r.quality], ls="--", label=f"{r.label}: wrong")
    axes[0].set_title("wrong pseudo-label pixels (%)")
    axes[1].set_title("mean weight W on right / wrong pseudo-labels")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(quality_path, lambda fh: fig.savefig(fh, format="png", dpi=120))
