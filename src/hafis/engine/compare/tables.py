"""Tables over the rows of ``results.json`` (one finished run each, :func:`~.report.result_rows`), for
``hafis compare --contrast`` and for reports that join several comparisons (``benchmarks/realistic.py``).

- :func:`arm_table`: per arm over its seeds, final and best mIoU and the change over the last quarter;
- :func:`contrast_table`: contrasts ``A:B``, the paired difference of A and B (over the seeds both finished, with a
  95 % t interval) at given fractions of the schedule, at its end and of the best evaluation;
- :func:`end_tables`: per arm, the IoU of every class at the end and the final pseudo-label diagnostics.

mIoU in percent with one decimal: these compare arms whose differences are a point or more.
"""

from __future__ import annotations

import statistics
from fractions import Fraction
from typing import Optional, Sequence

from hafis.config import ConfigError

from .report import mean_std, paired_interval

__all__ = ["FINAL_DIAGNOSTICS", "arm_table", "contrast_section", "contrast_table", "end_tables", "miou_at",
           "parse_contrast", "parse_fractions"]

#: the final evaluation's diagnostics in :func:`end_tables`: (key, heading, percent?)
FINAL_DIAGNOSTICS = [("auroc_weight", "AUROC W", False), ("auroc_weight_within_class", "AUROC W within class", False),
                     ("auroc_confidence", "AUROC conf", False),
                     ("auroc_confidence_within_class", "AUROC conf within class", False),
                     ("bank_detector_precision", "bank precision: detector %", True),
                     ("bank_confidence_precision", "bank precision: confidence %", True)]


def parse_contrast(text: str, arms: Sequence[str]) -> tuple[str, str]:
    """``--contrast "A:B"``: two arm names (an arm's name may hold a colon: the split is where both sides are
    arms)."""
    for i in [i for i, c in enumerate(text) if c == ":"]:
        a, b = text[:i].strip(), text[i + 1:].strip()
        if a in arms and b in arms:
            return a, b
    raise ConfigError(f"--contrast {text!r} must be 'ARM:ARM' with two of the arms: {', '.join(arms)}")


def parse_fractions(text: str) -> tuple[float, ...]:
    """``--at 0.25,0.5``: fractions of the schedule in (0, 1)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise ConfigError(f"--at {text!r} must be comma-separated fractions of the schedule in (0, 1), e.g. 0.25,0.5")
    return values


def miou_at(row: dict, fraction: float) -> Optional[float]:
    """The run's mIoU at the last evaluation at or before ``fraction`` of its schedule."""
    points = [(int(i), m) for i, m in row.get("miou_at", {}).items() if int(i) <= fraction * row["iterations"]]
    return max(points)[1] if points else None


def _by_arm(rows: Sequence[dict], arm: str) -> list[dict]:
    return sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])


def _stat(values: Sequence[float], sign: str = "") -> str:
    m, sd = mean_std(values)
    return f"{m:{sign}.1f} ± {sd:.1f}" if sd is not None else f"{m:{sign}.1f}"


def arm_table(rows: Sequence[dict], arms: Sequence[str]) -> list[str]:
    """``| arm | n | final mIoU | best mIoU | last quarter |``, mean ± std over the arm's runs; arms without one are
    left out."""
    lines = ["| arm | n | final mIoU | best mIoU | last quarter |", "|---|---|---|---|---|"]
    for arm in arms:
        got = _by_arm(rows, arm)
        if got:
            cells = []
            for key, sign in (("miou", ""), ("best_miou", ""), ("last_quarter_change", "+")):
                values = [100 * r[key] for r in got if r.get(key) is not None]
                cells.append(_stat(values, sign) if values else "–")
            lines.append(f"| {arm} | {len(got)} | {' | '.join(cells)} |")
    return lines


def _label(fraction: float) -> str:
    return str(Fraction(fraction).limit_denominator(100))


def _difference(diffs: Sequence[tuple[float, float]]) -> str:
    if not diffs:
        return "–"
    m, ci = paired_interval([100 * (x - y) for x, y in diffs])
    return f"{m:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})" if ci else f"{m:+.1f} (n = 1)"


def contrast_table(rows: Sequence[dict], contrasts: Sequence[tuple[str, str]],
                   fractions: Sequence[float] = (0.25, 0.5)) -> list[str]:
    """The paired differences ``A − B`` of ``contrasts``, pairing the runs of one seed; a contrast without a pair is
    left out. The sentence above the table says what the cells are."""
    labels = [_label(f) for f in fractions]
    at = " and ".join(filter(None, [", ".join(labels[:-1]), labels[-1]])) if labels else ""
    lines = ["Paired differences (mIoU points, mean and 95 % t interval over the seeds both arms finished) "
             + (f"at {at} of the schedule, " if at else "") + "at its end and of the best evaluation:", "",
             "| paired difference | n | " + "".join(f"Δ at {label} | " for label in labels) + "Δ final | Δ best |",
             "|---|---|" + "---|" * (len(labels) + 2)]
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    for arm, base in contrasts:
        pairs = [(a, b) for seed in seeds if (a := by.get((arm, seed))) and (b := by.get((base, seed)))]
        if not pairs:
            continue
        cells = [_difference([(x, y) for a, b in pairs
                              if (x := miou_at(a, f)) is not None and (y := miou_at(b, f)) is not None])
                 for f in fractions]
        cells += [_difference([(a[key], b[key]) for a, b in pairs]) for key in ("miou", "best_miou")]
        lines.append(f"| {arm} − {base} | {len(pairs)} | {' | '.join(cells)} |")
    return lines


def end_tables(rows: Sequence[dict], arms: Sequence[str]) -> list[str]:
    """Per arm, over its finished seeds: the IoU of every class at the end (mean ± std), and the final evaluation's
    pseudo-label diagnostics (mean): AUROC of W and of the confidence, pooled and within a class, the bank's
    precision by rule, and the mean W of each pseudo-label class. Each table ends with an empty line; none without
    its records."""
    classes = next((list(r["iou_by_class"]) for r in rows if r.get("iou_by_class")), [])
    lines = []
    if classes:
        lines += ["IoU per class (%, final evaluation, mean ± std over seeds):", "",
                  "| arm | n | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for arm in arms:
            got = [r["iou_by_class"] for r in rows if r["arm"] == arm and r.get("iou_by_class")]
            if got:
                cells = [_stat([100 * g[c] for g in got]) for c in classes]
                lines.append(f"| {arm} | {len(got)} | {' | '.join(cells)} |")
        lines.append("")
    diag = {arm: [r["diagnostics"] for r in rows if r["arm"] == arm and r.get("diagnostics")] for arm in arms}
    if any(diag.values()):
        heads = [h for _, h, _ in FINAL_DIAGNOSTICS] + [f"mean W: {c}" for c in classes]
        lines += ["Pseudo-label diagnostics at the final evaluation (the probe's unlabelled images, mean over seeds): "
                  "AUROC = how well W or the confidence ranks right pseudo-labels above wrong ones (0.5 = not at "
                  "all; within class = mean over classes with both), bank precision = right share of the pixels "
                  "each rule would let into the bank, mean W = over the pixels pseudo-labelled with the class (W "
                  "before any shuffle):", "",
                  "| arm | n | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
        keys = [(k, pct, 3) for k, _, pct in FINAL_DIAGNOSTICS] + [(f"weight_class_{i}", False, 2)
                                                                   for i in range(len(classes))]
        for arm in arms:
            if not diag[arm]:
                continue
            cells = []
            for key, pct, digits in keys:
                values = [d[key] for d in diag[arm] if d.get(key) is not None]
                m = statistics.fmean(values) if values else None
                cells.append("–" if m is None else f"{100 * m:.1f}" if pct else f"{m:.{digits}f}")
            lines.append(f"| {arm} | {len(diag[arm])} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def contrast_section(rows: Sequence[dict], arms: Sequence[str], contrasts: Sequence[tuple[str, str]],
                     fractions: Sequence[float] = (0.25, 0.5)) -> str:
    """``report.md``'s section of ``--contrast``: :func:`contrast_table` and :func:`end_tables` ("" without
    contrasts)."""
    if not contrasts:
        return ""
    lines = ["", "## Contrasts", "", *contrast_table(rows, contrasts, fractions), "", *end_tables(rows, arms)]
    return "\n".join(lines).rstrip("\n") + "\n"
