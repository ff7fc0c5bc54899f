"""The report of a comparison, a pure function of the runs' records: per-arm statistics, paired differences with
t intervals, the diagnostics table, ``results.json``'s content (:func:`results`) and ``report.md``."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

from .runs import RunData

#: diagnostics shown in the report's table and plot: (key, heading, percent?)
DIAGNOSTICS = [
    ("pseudo_error", "wrong %", True),
    ("pseudo_error_weighted", "wrong % W-weighted", True),
    ("confident_error", "wrong % (confident)", True),
    ("confident_error_weighted", "wrong % (confident) W-weighted", True),
    ("auroc_confidence", "AUROC conf", False),
    ("auroc_confidence_within_class", "AUROC conf within class", False),
    ("auroc_weight", "AUROC W", False),
    ("auroc_weight_within_class", "AUROC W within class", False),
    ("bank_confidence_precision", "bank precision: confidence", True),
    ("bank_detector_precision", "bank precision: detector", True),
]


def results(command: str, machine: str, runs: Sequence[RunData], summary: dict) -> dict:
    """The content of ``results.json``: the command, the machine, one row per finished run and the summary."""
    return {"command": command, "machine": machine, "runs": result_rows(runs), "summary": summary}


def result_rows(runs: Sequence[RunData]) -> list[dict]:
    """The ``runs`` list of results.json: one row per finished run. ``passes``: iterations x unlabelled batch /
    unlabelled images, how often the run saw its unlabelled set (None without unlabelled images); ``miou_at``:
    iteration -> mIoU of every evaluation, the learning curve; ``iou_by_class``: the final evaluation's; ``precision``:
    ``train.amp``; ``provenance``: the invocations that trained it, with a records folder."""
    rows = []
    for r in runs:
        final = r.final
        if final is None:
            continue
        unlabelled = final.get("unlabelled")
        passes = r.iterations * r.unlabelled_batch / unlabelled if unlabelled and r.unlabelled_batch else None
        rows.append({"arm": r.arm, "framework": r.framework, "weighting": dict(r.weighting), "seed": r.seed,
                     "labelled": final.get("labelled"), "unlabelled": unlabelled, "passes": passes,
                     "iterations": r.iterations, "miou": final["miou"],
                     "best_miou": final["best_miou"], "wall_s": r.wall_s if r.wall_s is not None else _train_time(r),
                     "last_quarter_change": last_quarter_change(r), "diagnostics": final.get("diagnostics"),
                     "miou_at": {str(e["iteration"]): e["miou"] for e in r.evals},
                     "iou_by_class": final.get("iou_by_class"), "precision": r.precision,
                     "provenance": r.provenance})
    return rows


def _train_time(run: RunData) -> float:
    """Seconds of training steps from the logs, for runs trained outside the runner (no recorded wall time)."""
    steps = [r for r in run.records if "seconds_per_iteration" in r]
    last, total = 0, 0.0
    for r in steps:
        total += r["seconds_per_iteration"] * (r["iteration"] - last)
        last = r["iteration"]
    return total


def last_quarter_change(run: RunData) -> Optional[float]:
    """Final mIoU minus the mIoU of the last evaluation at or before 3/4 of the schedule: near 0 when the run has
    converged (the test a benchmark's baseline must pass), None before the run finished or without that evaluation."""
    final = run.final
    earlier = [e for e in run.evals if e["iteration"] <= 0.75 * run.iterations]
    if final is None or not earlier:
        return None
    return final["miou"] - max(earlier, key=lambda e: e["iteration"])["miou"]


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, Optional[tuple[float, float]]]:
    """Mean of paired differences and its two-sided t interval (None for one pair: no spread to judge)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None
    half = t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, (mean - half, mean + half)


def summarise(runs: Sequence[RunData], arms: Sequence[str], seeds: Sequence[int], baseline: str) -> dict:
    """Per arm mean ± std of final and best mIoU and of the change over the last quarter of the schedule, paired
    differences to ``baseline``, missing runs."""
    finished = {(r.arm, r.seed): r.final for r in runs if r.final is not None}
    changes = {(r.arm, r.seed): last_quarter_change(r) for r in runs}
    arm_rows, paired, missing = [], [], []
    for arm in arms:
        got = [s for s in seeds if (arm, s) in finished]
        row = {"arm": arm, "n": len(got), "seeds": got}
        for key in ("miou", "best_miou"):
            if got:
                m, s = mean_std([finished[arm, seed][key] for seed in got])
                row[key] = {"mean": m, "std": s}
        quarter = [changes[arm, s] for s in got if changes.get((arm, s)) is not None]
        if quarter:
            m, s = mean_std(quarter)
            row["last_quarter_change"] = {"mean": m, "std": s}
        arm_rows.append(row)
        if arm != baseline:
            both = [s for s in got if (baseline, s) in finished]
            row = {"arm": arm, "baseline": baseline, "n": len(both), "seeds": both}
            for key in ("miou", "best_miou"):
                if both:
                    m, ci = paired_interval([finished[arm, s][key] - finished[baseline, s][key] for s in both])
                    row[key] = {"mean": m, "ci95": list(ci) if ci else None}
            paired.append(row)
    by_key = {(r.arm, r.seed): r for r in runs}
    for arm in arms:
        for seed in seeds:
            if (arm, seed) in finished:
                continue
            r = by_key.get((arm, seed))
            if r is not None and r.problem:
                why = r.problem
            elif r is not None and r.evals:
                why = f"unfinished (last evaluation at iteration {r.evals[-1]['iteration']} of {r.iterations})"
            else:
                why = "not run"
            missing.append({"arm": arm, "seed": seed, "why": why})
    return {"baseline": baseline, "arms": arm_rows, "paired": paired, "missing": missing}


def diagnostics_table(runs: Sequence[RunData], arms: Sequence[str], points: int = 4) -> list[dict]:
    """Mean over seeds of each diagnostic at up to ``points`` evaluation iterations per arm (first ... last)."""
    rows = []
    for arm in arms:
        curves = diagnostic_curves([r for r in runs if r.arm == arm])
        its = sorted(curves)
        if not its:
            continue
        k = min(points, len(its))
        picks = [its[-1]] if k == 1 else sorted({its[round(i * (len(its) - 1) / (k - 1))] for i in range(k)})
        for it in picks:
            rows.append({"arm": arm, "iteration": it, "seeds": curves[it]["n"],
                         **{k: curves[it].get(k) for k, _, _ in DIAGNOSTICS}})
    return rows


def diagnostic_curves(runs: Sequence[RunData]) -> dict[int, dict]:
    """iteration -> mean over the runs of each diagnostic logged at that evaluation (None where no run has it)."""
    values: dict[int, dict[str, list[float]]] = {}
    counts: dict[int, int] = {}
    for r in runs:
        for e in r.evals:
            d = e.get("diagnostics")
            if not d:
                continue
            counts[e["iteration"]] = counts.get(e["iteration"], 0) + 1
            for k, _, _ in DIAGNOSTICS:
                if d.get(k) is not None:
                    values.setdefault(e["iteration"], {}).setdefault(k, []).append(d[k])
    return {it: {"n": n, **{k: statistics.fmean(v) for k, v in values.get(it, {}).items()}}
            for it, n in counts.items()}


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _pm(stat: Optional[dict], sign: str = "") -> str:
    """``mean ± std`` in percent points; ``sign="+"`` for a change, which reads wrong without its sign."""
    if not stat:
        return "–"
    std = "–" if stat["std"] is None else f"{100 * stat['std']:.2f}"
    return f"{100 * stat['mean']:{sign}.2f} ± {std}"


def _diff(stat: Optional[dict]) -> tuple[str, str]:
    if not stat:
        return "–", "–"
    ci = stat["ci95"]
    return f"{100 * stat['mean']:+.2f}", ("n = 1: no interval" if ci is None else
                                         f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]")


def report_markdown(summary: dict, runs: Sequence[RunData], header: dict, arms: Sequence[str]) -> str:
    """The report: tables of ``summary`` and of the diagnostics, links to the plots. ``header``: command, machine,
    config, seeds, and optionally the title (default "hafis compare")."""
    base = summary["baseline"]
    lines = [f"# {header.get('title', 'hafis compare')}: `{header['config']}`", "",
             f"Command: `{header['command']}`  ", f"Machine: {header['machine']}  ",
             f"Seeds: {', '.join(map(str, header['seeds']))}; baseline arm: **{base}**. mIoU in %, mean ± sample "
             "std over the finished seeds (n); last quarter = final mIoU minus the mIoU at 3/4 of the schedule "
             "(near 0: converged).", "",
             "| arm | framework | weighting | n | final mIoU | best mIoU | last quarter | wall time / run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    first = {r.arm: r for r in runs}
    walls = {}
    for r in result_rows(runs):
        walls.setdefault(r["arm"], []).append(r["wall_s"])
    for row in summary["arms"]:
        r = first.get(row["arm"])
        w = r.weighting if r else {}
        weighting = (f"offset {w['offset']:g}, {w['normalize']}, {w['reliable']}"
                     f"{', W from confidence' if w.get('signal') == 'confidence' else ''}"
                     f"{', shuffled' if w.get('shuffle') else ''}" if w.get("enabled") else "off")
        wall = f"{statistics.fmean(walls[row['arm']]):.0f}" if row["arm"] in walls else "–"
        lines.append(f"| {row['arm']} | {r.framework if r else '–'} | {weighting} | {row['n']} | "
                     f"{_pm(row.get('miou'))} | {_pm(row.get('best_miou'))} | "
                     f"{_pm(row.get('last_quarter_change'), '+')} | {wall} |")
    lines += ["", f"Paired difference to **{base}** (arm − {base}, mIoU points, over the seeds both finished; 95 % "
              "t interval, scipy.stats.t):", "",
              "| arm | pairs | Δ final | 95 % interval | Δ best | 95 % interval |", "|---|---|---|---|---|---|"]
    for row in summary["paired"]:
        d_final, ci_final = _diff(row.get("miou"))
        d_best, ci_best = _diff(row.get("best_miou"))
        lines.append(f"| {row['arm']} | {row['n']} | {d_final} | {ci_final} | {d_best} | {ci_best} |")
    if summary["missing"]:
        lines += ["", "Missing runs (not in the tables above):", ""]
        lines += [f"- {m['arm']} seed {m['seed']}: {m['why']}" for m in summary["missing"]]
    lines += ["", "![mIoU over iterations](miou.png)", "",
              "`miou.png`: validation mIoU over iterations, mean over seeds (line) and min..max (band).", "",
              "## Pseudo-label diagnostics", ""]
    table = diagnostics_table(runs, arms)
    if not table:
        lines.append("No diagnostics were logged (set `eval.diagnostics_images` > 0, e.g. `--set "
                     "eval.diagnostics_images=64`).")
    else:
        lines += ["Unlabelled images whose ground truth never reaches training, at a few evaluations (mean over "
                  "seeds). Wrong % = wrong pseudo-label pixels among the non-ignored ones; W-weighted = Σ W·wrong / "
                  "Σ W (what the weighted loss sees); AUROC = how well W or the confidence ranks right pseudo-labels "
                  "above wrong ones (0.5 = not at all; within class = mean over classes with both); bank precision = "
                  "right share of the pixels that would feed the prototype bank. W columns are empty for arms "
                  "without the weighting, the detector column without detections.", "",
                  "| arm | iteration | seeds | " + " | ".join(h for _, h, _ in DIAGNOSTICS) + " |",
                  "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
        for row in table:
            cells = [("–" if row[k] is None else (_pct(row[k]) if pct else f"{row[k]:.3f}"))
                     for k, _, pct in DIAGNOSTICS]
            lines.append(f"| {row['arm']} | {row['iteration']} | {row['seeds']} | " + " | ".join(cells) + " |")
        lines += ["", "![diagnostics over training](diagnostics.png)"]
    return "\n".join(lines) + "\n"
