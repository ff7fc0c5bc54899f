"""``hafis compare``: every arm x seed of an experiment as its own ``hafis train`` process, then one report.

Identical runs of an SSL recipe differ by 0.3-1.4 mIoU, so one run per method hides small effects. The runner trains
each arm (a set of overrides) with each seed, ``--jobs N`` at a time with the CPU threads split between them, and
writes ``DIR/results.json`` and ``DIR/report.md`` (mean ± std per arm, the paired difference to a baseline arm with a
95 % t interval over the seeds, mIoU over training, pseudo-label diagnostics) as runs finish.

Layout: ``DIR/runs/ARM/seed_S/`` is an ordinary run directory (plus ``compare.log``, the process's output, and
``compare_run.json``, its wall time and exit status); ``DIR/detectors/KEY/`` holds the detector and detection cache
shared by every arm of a seed whose detector inputs are the same (the detector depends on the data, the labelled
images, the detector recipe and the seed, never on the segmentation arm, so training it once per arm would only
repeat the same work). A finished run (its final evaluation is in ``metrics.jsonl``) is reused, an unfinished one is
continued with ``--resume``; a run directory made with another config is reported, never overwritten.

The report is a pure function of the runs' metrics (:func:`summarise`, :func:`report_markdown`), so
``--report-only`` rebuilds it from what exists and tests check it against a hand computation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from hafis.config import Config, ConfigError, config_changes, load_config, to_dict
from hafis.files import atomic_write, write_json

from .run_log import read_metrics

_DEFAULT_DETECTOR_DIR = "runs/{name}/detector"
#: the arms, seeds and overrides of a comparison, so ``--report-only`` needs nothing but ``--out``
PLAN_FILE = "compare.json"
#: data keys that change augmentation or loading only (as hafis.engine.detect): they do not change the detector
_NOT_DETECTOR_INPUT = ("crop_size", "scale_range", "num_workers", "cache_dir")
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


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Arm:
    name: str
    overrides: list[str]

    @property
    def slug(self) -> str:
        """The arm's folder name: its name with anything but letters, digits and ``._+-`` replaced by ``_``."""
        return re.sub(r"[^A-Za-z0-9._+-]", "_", self.name)


def parse_arm(text: str) -> Arm:
    """``"NAME: key=value key=value"`` (values may be quoted as in a shell)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--arm {text!r} must be 'NAME: key=value ...' (a name, a colon, then overrides)")
    try:
        overrides = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"--arm {text!r}: {exc}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--arm {name!r}: {bad[0]!r} is not of the form key=value")
    return Arm(name, overrides)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers such as 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must name at least one seed, each once")
    return seeds


@dataclass
class RunSpec:
    """One arm x seed: its config (validated) and the command lines that train it."""

    arm: Arm
    seed: int
    config: Config
    run_dir: Path
    overrides: list[str]
    #: the shared detector folder when the arm needs ``hafis detect`` first, else None
    detector_dir: Optional[Path] = None

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "compare.log"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "compare_run.json"


def detector_key(config: Config) -> str:
    """What the detector of a run depends on (data identity, detector recipe, seed), hashed: arms with equal keys
    share one detector and one detection cache."""
    data = {k: v for k, v in to_dict(config.data).items() if k not in _NOT_DETECTOR_INPUT}
    detector = {k: v for k, v in to_dict(config.detector).items()
                if k not in ("output_dir", "inference_batch_size", "chunk_size")}
    text = json.dumps({"data": data, "detector": detector, "seed": config.seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def needs_detector(config: Config) -> bool:
    return config.weighting.enabled and config.weighting.reliable == "detector"


def plan_runs(config_path: Path, arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str],
              out: Path) -> list[RunSpec]:
    """Every arm x seed, seed-major (all arms of the first seed first, so paired results come early). Every config
    is loaded here, so a bad key in any arm stops before anything runs."""
    if not arms:
        raise ConfigError("give at least one --arm 'NAME: key=value ...'")
    slugs = [a.slug for a in arms]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"--arm names must differ (as folder names): {dup[0]!r} is used twice")
    specs = []
    for seed in seeds:
        for arm in arms:
            run_dir = out / "runs" / arm.slug / f"seed_{seed}"
            overrides = [*common, *arm.overrides, f"seed={seed}", f"name={arm.slug}-seed{seed}",
                         f"output_dir={run_dir}", "train.progress_bar=false"]
            try:
                config = load_config(config_path, overrides)
            except ConfigError as exc:
                raise ConfigError(f"arm {arm.name!r}: {exc}") from None
            detector_dir = None
            if needs_detector(config):
                if config.detector.output_dir == _DEFAULT_DETECTOR_DIR:
                    detector_dir = out / "detectors" / detector_key(config)
                    overrides.append(f"detector.output_dir={detector_dir}")
                    config = load_config(config_path, overrides)
                else:
                    detector_dir = Path(config.detector.output_dir.format(name=config.name))
            specs.append(RunSpec(arm, seed, config, run_dir, overrides, detector_dir))
    return specs


# ------------------------------------------------------------------------------------------ state on disk
def final_eval(records: Sequence[dict], iterations: int) -> Optional[dict]:
    """The evaluation at the end of the schedule, or None when the run has not got there."""
    done = [r for r in records if r.get("event") == "eval" and r.get("iteration") == iterations]
    return done[-1] if done else None


def _read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        return read_metrics(path)
    except (OSError, json.JSONDecodeError):
        return []  # a line cut by a kill: the run resumes from its checkpoint and rewrites it


def _config_conflict(spec: RunSpec) -> Optional[str]:
    """The keys that alter the experiment (:func:`hafis.config.config_changes`: not where it is written or how it
    is logged) where an existing run directory's config.yaml differs from the planned one, if any."""
    path = spec.run_dir / "config.yaml"
    if not path.is_file():
        return None
    diff = sorted(config_changes(yaml.safe_load(path.read_text()) or {}, spec.config))
    if not diff:
        return None
    return (f"{spec.run_dir} was trained with another config (differs in: {', '.join(diff[:5])}); remove it or "
            f"use another --out")


def _read_status(spec: RunSpec) -> dict:
    try:
        return json.loads(spec.status_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------- the report (pure)
@dataclass
class RunData:
    """What the report needs of one arm x seed: its planned settings and its metrics.jsonl records."""

    arm: str
    seed: int
    framework: str
    weighting: dict
    iterations: int
    records: list[dict] = field(default_factory=list)
    wall_s: Optional[float] = None
    #: why the run has no final result (failed, config conflict), with its log path; None = ran or not started
    problem: Optional[str] = None

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "eval"]

    @property
    def final(self) -> Optional[dict]:
        return final_eval(self.records, self.iterations)


def run_data(spec: RunSpec, problem: Optional[str] = None) -> RunData:
    w = spec.config.weighting
    status = _read_status(spec)
    return RunData(spec.arm.name, spec.seed, spec.config.train.framework,
                   {"enabled": w.enabled, "offset": w.offset, "normalize": w.normalize, "reliable": w.reliable},
                   spec.config.train.iterations, _read_records(spec.run_dir), status.get("wall_s"),
                   problem or status.get("problem"))


def result_rows(runs: Sequence[RunData]) -> list[dict]:
    """The ``runs`` list of results.json: one row per finished run."""
    rows = []
    for r in runs:
        final = r.final
        if final is None:
            continue
        rows.append({"arm": r.arm, "framework": r.framework, "weighting": dict(r.weighting), "seed": r.seed,
                     "labelled": final.get("labelled"), "iterations": r.iterations, "miou": final["miou"],
                     "best_miou": final["best_miou"], "wall_s": r.wall_s if r.wall_s is not None else _train_time(r),
                     "last_quarter_change": last_quarter_change(r), "diagnostics": final.get("diagnostics")})
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
        curves = _diagnostic_curves([r for r in runs if r.arm == arm])
        its = sorted(curves)
        if not its:
            continue
        k = min(points, len(its))
        picks = [its[-1]] if k == 1 else sorted({its[round(i * (len(its) - 1) / (k - 1))] for i in range(k)})
        for it in picks:
            rows.append({"arm": arm, "iteration": it, "seeds": curves[it]["n"],
                         **{k: curves[it].get(k) for k, _, _ in DIAGNOSTICS}})
    return rows


def _diagnostic_curves(runs: Sequence[RunData]) -> dict[int, dict]:
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
    config, seeds."""
    base = summary["baseline"]
    lines = [f"# hafis compare: `{header['config']}`", "",
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
        weighting = (f"offset {w['offset']:g}, {w['normalize']}, {w['reliable']}" if w.get("enabled") else "off")
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


# ---------------------------------------------------------------------------------------------- the plots
def plot_miou(runs: Sequence[RunData], arms: Sequence[str], path: Path) -> bool:
    """Validation mIoU over iterations per arm: mean over seeds and a min..max band; False (nothing written)
    before the first evaluation."""
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

    panels = [("wrong pseudo-labels (%)", "pseudo_error_weighted", "pseudo_error", 100),
              ("AUROC for a right pseudo-label", "auroc_weight", "auroc_confidence", 1),
              ("bank precision (%)", "bank_detector_precision", "bank_confidence_precision", 100)]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    drawn = False
    for arm in arms:
        curves = _diagnostic_curves([r for r in runs if r.arm == arm])
        its = sorted(curves)
        if not its:
            continue
        colour = None
        for ax, (title, solid, dashed, scale) in zip(axes, panels):
            for key, style in ((solid, "-"), (dashed, "--")):
                pts = [(i, scale * curves[i][key]) for i in its if curves[i].get(key) is not None]
                if pts:
                    (line,) = ax.plot(*zip(*pts), ls=style, color=colour, label=f"{arm}: {key}")
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


# ---------------------------------------------------------------------------------------------- the runner
def machine_description() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def _child_env(threads: int) -> dict:
    """The environment of a run: its share of the threads, and this hafis first on the path."""
    import hafis

    env = dict(os.environ)
    src = str(Path(hafis.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    return env


class Comparison:
    """The state of one ``hafis compare`` call: the plan, and the outputs rewritten as runs finish."""

    def __init__(self, config_path: Path, arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str],
                 out: Path, baseline: Optional[str], command: str, log: Callable[[str], None] = print) -> None:
        self.config_path, self.arms, self.seeds, self.out = Path(config_path), list(arms), list(seeds), Path(out)
        self.common = list(common)
        self.specs = plan_runs(self.config_path, self.arms, self.seeds, self.common, self.out)
        names = [a.name for a in self.arms]
        if baseline is not None and baseline not in names:
            raise ConfigError(f"--baseline {baseline!r} is not an arm; arms: {', '.join(names)}")
        self.baseline = baseline or names[0]
        self.command, self.log = command, log
        self.machine = machine_description()
        self.problems: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_plan(cls, out: Path, log: Callable[[str], None] = print) -> "Comparison":
        """The comparison an earlier ``hafis compare`` call wrote to ``out/compare.json`` (for ``--report-only``)."""
        path = Path(out) / PLAN_FILE
        try:
            plan = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--report-only: cannot read {path} ({exc}); give CONFIG and the --arm options") from None
        return cls(Path(plan["config"]), [Arm(n, o) for n, o in plan["arms"]], plan["seeds"], plan["common"], out,
                   plan["baseline"], plan["command"], log)

    def save_plan(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / PLAN_FILE, {
            "config": str(self.config_path), "arms": [[a.name, a.overrides] for a in self.arms], "seeds": self.seeds,
            "common": self.common, "baseline": self.baseline, "command": self.command}, indent=1)

    # ----------------------------------------------------------------------------------------- outputs
    def collect(self) -> list[RunData]:
        return [run_data(s, self.problems.get((s.arm.name, s.seed))) for s in self.specs]

    def write_outputs(self) -> dict:
        """results.json, report.md and the plots from what is on disk now."""
        with self._lock:
            runs = self.collect()
            arms = [a.name for a in self.arms]
            summary = summarise(runs, arms, self.seeds, self.baseline)
            results = {"command": self.command, "machine": self.machine, "runs": result_rows(runs),
                       "summary": summary}
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "results.json", results, indent=1)
            header = {"config": str(self.config_path), "command": self.command, "machine": self.machine,
                      "seeds": self.seeds}
            plot_miou(runs, arms, self.out / "miou.png")
            plot_diagnostics(runs, arms, self.out / "diagnostics.png")
            atomic_write(self.out / "report.md", report_markdown(summary, runs, header, arms))
            return results

    # ------------------------------------------------------------------------------------------ running
    def run(self, jobs: int = 1) -> int:
        """Train what is missing, ``jobs`` processes at a time; 0 when every run finished, 1 when some failed."""
        jobs = max(1, jobs)
        self.save_plan()
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env = _child_env(threads)
        todo = []
        for spec in self.specs:
            conflict = _config_conflict(spec)
            if conflict:
                self.problems[spec.arm.name, spec.seed] = conflict
                self.log(f"[compare] {spec.label}: {conflict}")
            elif final_eval(_read_records(spec.run_dir), spec.config.train.iterations) is not None:
                self.log(f"[compare] {spec.label}: finished before, reused ({spec.run_dir})")
            else:
                todo.append(spec)
        self.write_outputs()
        self.log(f"[compare] {len(todo)} of {len(self.specs)} runs to train, {jobs} at a time with {threads} "
                 f"thread(s) each; report: {self.out / 'report.md'}")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            detect_failed = self._detect_all(todo, pool, env)
            for _ in pool.map(lambda s: self._train_one(s, env, detect_failed.get(s.detector_dir)), todo):
                pass
        self.write_outputs()
        failed = [k for k in self.problems]
        self.log(f"[compare] done: {len(self.specs) - len(failed)} of {len(self.specs)} runs finished; "
                 f"{self.out / 'report.md'}")
        return 1 if failed else 0

    def _detect_all(self, todo: Sequence[RunSpec], pool: ThreadPoolExecutor, env: dict) -> dict:
        """``hafis detect`` once per distinct detector folder of the runs to train; returns folder -> problem."""
        first: dict[Path, RunSpec] = {}
        for spec in todo:
            if spec.detector_dir is not None:
                first.setdefault(spec.detector_dir, spec)

        def detect(spec: RunSpec) -> tuple[Path, Optional[str]]:
            spec.detector_dir.mkdir(parents=True, exist_ok=True)
            log_path = spec.detector_dir / "detect.log"
            self.log(f"[compare] detector for {spec.label} (shared by the arms of seed {spec.seed} with the same "
                     f"detector inputs): {spec.detector_dir}")
            rc = self._subprocess(["detect", str(self.config_path), *spec.overrides], log_path, env)
            return spec.detector_dir, None if rc == 0 else f"hafis detect failed (exit {rc}); log: {log_path}"

        return {d: p for d, p in pool.map(detect, first.values()) if p}

    def _train_one(self, spec: RunSpec, env: dict, detect_problem: Optional[str]) -> None:
        key = (spec.arm.name, spec.seed)
        if detect_problem:
            self.problems[key] = detect_problem
            self.log(f"[compare] {spec.label}: not trained, {detect_problem}")
            self.write_outputs()
            return
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        status = _read_status(spec)
        ckpts = spec.run_dir / "checkpoints"
        resume = ckpts.is_dir() and any(ckpts.glob("*.pt"))
        if not resume and (spec.run_dir / "metrics.jsonl").is_file():
            (spec.run_dir / "metrics.jsonl").unlink()  # no checkpoint: the run starts over and logs from iteration 0
        self.log(f"[compare] {spec.label}: {'resuming' if resume else 'training'} -> {spec.run_dir}")
        t0 = time.perf_counter()
        rc = self._subprocess(["train", str(self.config_path), *spec.overrides, *(["--resume"] if resume else [])],
                              spec.log_path, env)
        wall = (status.get("wall_s") or 0.0) + time.perf_counter() - t0
        finished = final_eval(_read_records(spec.run_dir), spec.config.train.iterations) is not None
        problem = None
        if rc != 0 or not finished:
            problem = f"failed (exit {rc}); log: {spec.log_path}"
            self.problems[key] = problem
        write_json(spec.status_path, {"wall_s": wall, "returncode": rc, "problem": problem,
                                              "log": str(spec.log_path)}, indent=1)
        self.log(f"[compare] {spec.label}: " + (problem or f"finished in {wall:.0f} s"))
        self.write_outputs()

    def _subprocess(self, args: list[str], log_path: Path, env: dict) -> int:
        command = [sys.executable, "-m", "hafis", *args]
        with open(log_path, "a") as fh:
            fh.write(f"$ {shlex.join(command)}\n")
            fh.flush()
            return subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
