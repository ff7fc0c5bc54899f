"""The process pool of a comparison: ``hafis detect`` once per shared detector, ``hafis train`` per arm x seed,
``jobs`` at a time, and the outputs rewritten as runs finish."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from hafis.config import ConfigError
from hafis.detection.identity import inference_identity
from hafis.files import atomic_write, write_json

from .plan import PLAN_FILE, Arm, RunSpec, plan_runs
from .plots import plot_diagnostics, plot_miou
from .records import archive, checkout, code_paths, provenance, record_invocation, restore
from .report import report_markdown, result_rows, results, summarise
from .runs import RunData, config_conflict, final_eval, read_records, read_status, run_data
from .tables import contrast_section

#: seconds between the updates of a training run's recorded time (compare_run.json) while it runs
STATUS_INTERVAL = 60.0


def _write_status(spec: RunSpec, wall_s: float, returncode: Optional[int] = None,
                  problem: Optional[str] = None) -> None:
    """A run's status file (read back by :func:`~.runs.read_status`): its time over all invocations so far, and how
    the last one ended (``returncode`` None while it trains)."""
    write_json(spec.status_path, {"wall_s": wall_s, "returncode": returncode, "problem": problem,
                                  "log": str(spec.log_path)}, indent=1)


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


#: the entries of ``compare.json`` and their types (``title``, optional, names the report)
PLAN_ENTRIES = {"config": str, "arms": list, "seeds": list, "common": list, "baseline": (str, type(None)),
                "command": str, "title": (str, type(None))}


def plan_problem(plan: object) -> Optional[str]:
    """What makes ``plan`` (a parsed ``compare.json``) unusable, or ``None``."""
    if not isinstance(plan, dict):
        return f"a {type(plan).__name__}, not a mapping"
    for key, kind in PLAN_ENTRIES.items():
        if key not in plan and key != "title":
            return f"no {key!r} entry"
        if key in plan and not isinstance(plan[key], kind):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in (kind if isinstance(kind, tuple)
                                                                                    else (kind,)))
            return f"{key!r} must be {names}, got {type(plan[key]).__name__}"
    if not all(isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], list)
               and all(isinstance(o, str) for o in a[1]) for a in plan["arms"]):
        return "'arms' must hold [name, [key=value, ...]] pairs"
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in plan["seeds"]):
        return "'seeds' must hold whole numbers"
    if not all(isinstance(x, str) for x in plan["common"]):
        return "'common' must hold key=value strings"
    return None


class Comparison:
    """The state of one ``hafis compare`` call: the plan, and the outputs rewritten as runs finish."""

    def __init__(self, config_path: Path, arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str],
                 out: Path, baseline: Optional[str], command: str, log: Callable[[str], None] = print,
                 title: Optional[str] = None, records: Optional[Path] = None,
                 contrasts: Sequence[tuple[str, str]] = (), fractions: Sequence[float] = (0.25, 0.5)) -> None:
        #: the report's heading (``hafis demo`` names itself); None = "hafis compare"
        self.title = title
        #: the folder the finished runs' records are copied into (:mod:`.records`), None = none
        self.records = None if records is None else Path(records)
        #: ``(A, B)``: the paired differences of the report's contrasts section, at ``fractions`` of the schedule
        self.contrasts, self.fractions = [tuple(c) for c in contrasts], tuple(fractions)
        self.config_path, self.arms, self.seeds, self.out = Path(config_path), list(arms), list(seeds), Path(out)
        self.common = list(common)
        self.specs = plan_runs(self.config_path, self.arms, self.seeds, self.common, self.out)
        names = [a.name for a in self.arms]
        if baseline is not None and baseline not in names:
            raise ConfigError(f"--baseline {baseline!r} is not an arm; arms: {', '.join(names)}")
        self.baseline = baseline or names[0]
        unknown = sorted({a for c in self.contrasts for a in c} - set(names))
        if unknown:
            raise ConfigError(f"--contrast: {unknown[0]!r} is not an arm; arms: {', '.join(names)}")
        self.command, self.log = command, log
        self.machine = machine_description()
        self.problems: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_plan(cls, out: Path, log: Callable[[str], None] = print,
                  records: Optional[Path] = None) -> "Comparison":
        """The comparison an earlier ``hafis compare`` call wrote to ``out/compare.json`` (for ``--report-only``)."""
        path = Path(out) / PLAN_FILE
        try:
            plan = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--report-only: cannot read {path} ({exc}); give CONFIG and the --arm options") from None
        problem = plan_problem(plan)
        if problem:
            raise ConfigError(f"--report-only: {path} is not a plan hafis compare wrote ({problem}); give CONFIG and "
                              "the --arm options")
        return cls(Path(plan["config"]), [Arm(n, o) for n, o in plan["arms"]], plan["seeds"], plan["common"], out,
                   plan["baseline"], plan["command"], log, plan.get("title"), records, plan.get("contrasts", ()),
                   plan.get("at", (0.25, 0.5)))

    def save_plan(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / PLAN_FILE, {
            "config": str(self.config_path), "arms": [[a.name, a.overrides] for a in self.arms], "seeds": self.seeds,
            "common": self.common, "baseline": self.baseline, "command": self.command,
            **({"title": self.title} if self.title else {}),
            **({"contrasts": self.contrasts, "at": self.fractions} if self.contrasts else {})}, indent=1)

    # ----------------------------------------------------------------------------------------- outputs
    def collect(self) -> list[RunData]:
        return [run_data(s, self.problems.get((s.arm.name, s.seed)), self.records) for s in self.specs]

    def write_outputs(self, extra: str = "") -> str:
        """results.json, report.md (followed by ``extra``, markdown) and the plots from what is on disk now; returns
        the report."""
        with self._lock:
            runs = self.collect()
            arms = [a.name for a in self.arms]
            summary = summarise(runs, arms, self.seeds, self.baseline)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "results.json", results(self.command, self.machine, runs, summary), indent=1)
            header = {"config": str(self.config_path), "command": self.command, "machine": self.machine,
                      "seeds": self.seeds, **({"title": self.title} if self.title else {})}
            plot_miou(runs, arms, self.out / "miou.png")
            plot_diagnostics(runs, arms, self.out / "diagnostics.png")
            report = (report_markdown(summary, runs, header, arms)
                      + contrast_section(result_rows(runs), arms, self.contrasts, self.fractions) + extra)
            atomic_write(self.out / "report.md", report)
            if self.records is not None:
                archive(self.out, self.records)
            return report

    def report(self) -> str:
        """``--report-only``: the outputs of the runs there are (the archived ones put back first)."""
        if self.records is not None:
            restore(self.out, self.records)
        return self.write_outputs()

    # ------------------------------------------------------------------------------------------ running
    def run(self, jobs: int = 1, threads: Optional[int] = None) -> int:
        """Train what is missing, ``jobs`` processes at a time with ``threads`` CPU threads each (default: the cores
        shared out); 0 when every run finished, 1 when some failed."""
        jobs = max(1, jobs)
        if self.records is not None:
            restore(self.out, self.records)
        self.save_plan()
        threads = max(1, threads or (os.cpu_count() or 1) // jobs)
        precision = ",".join(sorted({s.config.train.amp for s in self.specs}))
        record_invocation(self.out, provenance(checkout(), code_paths(self.config_path)), precision, threads,
                          [a.name for a in self.arms], self.seeds, self.common)
        self._warn_if_emulated()
        env = _child_env(threads)
        todo = []
        for spec in self.specs:
            conflict = config_conflict(spec)
            if conflict:
                self.problems[spec.arm.name, spec.seed] = conflict
                self.log(f"[compare] {spec.label}: {conflict}")
            elif final_eval(read_records(spec.run_dir), spec.config.train.iterations) is not None:
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

    def _warn_if_emulated(self) -> None:
        """One line when runs train bf16 steps on a CPU that emulates bf16 (slower than float32)."""
        import torch

        from hafis.precision import cpu_native_bf16

        if any(s.config.train.amp == "bf16" for s in self.specs) and not torch.cuda.is_available() \
                and not cpu_native_bf16():
            self.log("[compare] warning: this CPU has no native bf16 (AVX512-BF16 / AMX-BF16): bf16 steps are "
                     "emulated and slower than float32 (train.amp=off)")

    def _detect_all(self, todo: Sequence[RunSpec], pool: ThreadPoolExecutor, env: dict) -> dict:
        """``hafis detect`` per distinct detector folder of the runs to train, folders side by side; within a folder
        once per distinct inference setting (:func:`~hafis.detection.identity.inference_identity`), one after the
        other: the first trains the detector, the others reuse it and cache their own detections. Returns folder ->
        problem."""
        groups: dict[Path, dict[str, RunSpec]] = {}
        for spec in todo:
            if spec.detector_dir is not None:
                setting = json.dumps(inference_identity(spec.config), sort_keys=True)
                groups.setdefault(spec.detector_dir, {}).setdefault(setting, spec)

        def detect(specs: list[RunSpec]) -> tuple[Path, Optional[str]]:
            folder = specs[0].detector_dir
            folder.mkdir(parents=True, exist_ok=True)
            log_path = folder / "detect.log"
            for spec in specs:
                self.log(f"[compare] detector for {spec.label} (shared by the arms of seed {spec.seed} with the same "
                         f"detector inputs): {folder}")
                rc = self._subprocess(["detect", str(self.config_path), *spec.overrides], log_path, env)
                if rc != 0:
                    return folder, f"hafis detect failed (exit {rc}); log: {log_path}"
            return folder, None

        return {d: p for d, p in pool.map(detect, [list(g.values()) for g in groups.values()]) if p}

    def _train_one(self, spec: RunSpec, env: dict, detect_problem: Optional[str]) -> None:
        key = (spec.arm.name, spec.seed)
        if detect_problem:
            self.problems[key] = detect_problem
            self.log(f"[compare] {spec.label}: not trained, {detect_problem}")
            self.write_outputs()
            return
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        status = read_status(spec)
        ckpts = spec.run_dir / "checkpoints"
        resume = ckpts.is_dir() and any(ckpts.glob("*.pt"))
        if not resume and (spec.run_dir / "metrics.jsonl").is_file():
            (spec.run_dir / "metrics.jsonl").unlink()  # no checkpoint: the run starts over and logs from iteration 0
        self.log(f"[compare] {spec.label}: {'resuming' if resume else 'training'} -> {spec.run_dir}")
        spent, t0 = status.get("wall_s") or 0.0, time.perf_counter()

        def record_time() -> None:  # while it trains: a runner killed outright loses at most one interval of time
            _write_status(spec, spent + time.perf_counter() - t0)

        rc = self._subprocess(["train", str(self.config_path), *spec.overrides, *(["--resume"] if resume else [])],
                              spec.log_path, env, every=record_time)
        wall = spent + time.perf_counter() - t0
        finished = final_eval(read_records(spec.run_dir), spec.config.train.iterations) is not None
        problem = None
        if rc != 0 or not finished:
            problem = f"failed (exit {rc}); log: {spec.log_path}"
            self.problems[key] = problem
        _write_status(spec, wall, rc, problem)
        self.log(f"[compare] {spec.label}: " + (problem or f"finished in {wall:.0f} s"))
        self.write_outputs()

    def _subprocess(self, args: list[str], log_path: Path, env: dict,
                    every: Optional[Callable[[], None]] = None) -> int:
        """Run ``hafis ARGS`` with its output appended to ``log_path``; ``every`` is called each
        :data:`STATUS_INTERVAL` seconds while it runs."""
        command = [sys.executable, "-m", "hafis", *args]
        with open(log_path, "a") as fh:
            fh.write(f"$ {shlex.join(['python', *command[1:]])}\n")  # the interpreter's path is the machine's
            fh.flush()
            proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
            try:
                while True:
                    try:
                        return proc.wait(timeout=STATUS_INTERVAL)
                    except subprocess.TimeoutExpired:
                        if every is not None:
                            every()
            except BaseException:  # as subprocess.run: an interrupted runner leaves no orphan training
                proc.kill()
                proc.wait()
                raise
