"""The comparison's pictures: ``miou.png`` (mIoU over training per arm), ``diagnostics.png``, and the curves of chosen
arms over the result rows of several comparisons (:func:`plot_curves`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from hafis.extras import require
from hafis.files import atomic_write

from .report import diagnostic_curves
from .runs import RunData


def plot_miou(runs: Sequence[RunData], arms: Sequence[str], path: Path) -> bool:
    """Validation mIoU over iterations per arm: mean over seeds and a min..max band; False (nothing written)
    before the first evaluation."""
    Figure = require("matplotlib.figure", "viz", "the comparison's plots").Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for arm in arms:
        by_it: dict[int, list[float]] = {}
        for r in runs:
            if r.arm == arm:
                for e in r.evals:
                    by_it.setdefault(e["iteration"], []).append(100 * e["miou"])
        if not by_it:
            continue
        its = sorted(by_it)
        mean = [statistics.fmean(by_it[i]) for i in its]
        (line,) = ax.plot(its, mean, marker="o", ms=3, label=arm)
        ax.fill_between(its, [min(by_it[i]) for i in its], [max(by_it[i]) for i in its], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    if not ax.lines:
        return False
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    return True


def plot_diagnostics(runs: Sequence[RunData], arms: Sequence[str], path: Path) -> bool:
    """Wrong share (unweighted solid, W-weighted dashed), AUROC (W solid, confidence dashed) and bank precision
    (detector solid, confidence dashed) over training; False (nothing written) without diagnostics."""
    Figure = require("matplotlib.figure", "viz", "the comparison's plots").Figure

    panels = [("wrong pseudo-labels (%)", "pseudo_error_weighted", "pseudo_error", 100),
              ("AUROC for a right pseudo-label", "auroc_weight", "auroc_confidence", 1),
              ("bank precision (%)", "bank_detector_precision", "bank_confidence_precision", 100)]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    drawn = False
    for arm in arms:
        curves = diagnostic_curves([r for r in runs if r.arm == arm])
        its = sorted(curves)
        if not its:
            continue
        colour = None
        for ax, (title, solid, dashed, scale) in zip(axes, panels, strict=True):
            for key, style in ((solid, "-"), (dashed, "--")):
                pts = [(i, scale * curves[i][key]) for i in its if curves[i].get(key) is not None]
                if pts:
                    (line,) = ax.plot(*zip(*pts, strict=True), ls=style, color=colour, label=f"{arm}: {key}")
                    colour = line.get_color()
                    drawn = True
            ax.set_title(title, fontsize=9)
    if not drawn:
        return False
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    return True


def plot_curves(rows: Sequence[dict], arms: Sequence[str], path: Path, title: str) -> bool:
    """Validation mIoU against iteration of ``arms`` from result rows (``miou_at``, any number of comparisons): the
    mean over seeds (line) and min..max over them (band); False (nothing written) when none of them has a run."""
    Figure = require("matplotlib.figure", "viz", "the comparison's plots").Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for arm in arms:
        curves = [r["miou_at"] for r in rows if r["arm"] == arm and r.get("miou_at")]
        if not curves:
            continue
        its = sorted({int(i) for c in curves for i in c})
        at = [[100 * c[str(i)] for c in curves if str(i) in c] for i in its]
        (line,) = ax.plot(its, [statistics.fmean(v) for v in at], marker="o", ms=2.5, lw=1.2,
                          label=f"{arm} (n = {len(curves)})")
        ax.fill_between(its, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.15, lw=0)
    if not ax.lines:
        return False
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    return True
