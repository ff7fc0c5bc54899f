"""The realistic benchmark: does semi-supervised learning work here, and does the weighting add to it?

Garments (Fashion-MNIST) composited onto real photographs (``data.dataset: garments``), DeepLabV3+ on an
ImageNet-pretrained EfficientNet-Lite0 (``configs/realistic/base.yaml``), labelled splits of one 2,000-image training
pool, every arm over seeds through ``hafis compare``. The benchmark's own settings (image size, split sizes,
schedule, learning rate) were chosen on the supervised and UniMatch arms only; the weighting arms run with the
method's published settings (k = 5, τ = 0.95, detector-verified bank, memory 256 per class).

    python benchmarks/realistic.py --stage calibrate  # 1/32: supervised and unimatch, seed 0
    python benchmarks/realistic.py --stage core       # 1/32: supervised, unimatch, unimatch+W (paper, authors); 5 seeds
    python benchmarks/realistic.py --stage evidence   # 1/32: the core arms and the weighting's four controls (5 seeds),
                                                      # then augseg, u2pl and ael, each bare, +W, +W(authors) (3 seeds,
                                                      # --more-seeds 0,1,2,3,4 where time allows)
    python benchmarks/realistic.py --stage convergence  # 1/32: supervised on twice the schedule (its plateau?)
    python benchmarks/realistic.py --stage all        # + the other arms (3 seeds), fully supervised and 1/8
    python benchmarks/realistic.py --stage core --arms 'unimatch+W,unimatch+W(authors)'  # some arms only
    python benchmarks/realistic.py --archive-only     # copy the finished runs' records into the repository now
    python benchmarks/realistic.py --report-only      # rebuild benchmarks/results/realistic.{json,md} from the
                                                      # finished runs of the stage (archived ones included)
    python benchmarks/realistic.py --preset gpu       # one GPU: 128 px, 10 classes, 40 passes (results/realistic_gpu*)

The protocol:
- **a fixed labelled split per benchmark split**: the first ``n`` images of one permutation of the pool drawn with
  ``data.garments.split_seed`` (:data:`SPLIT_SEED`), the same for every arm and seed; a run's seed varies the
  initialisation, the data order and the augmentation only;
- **a schedule counted in passes over the unlabelled set**: the unlabelled set is the next
  :data:`UNLABELLED_PER_LABELLED` x ``n`` images of the same permutation (at most the rest of the pool), and every
  arm of a split trains ``passes x unlabelled / unlabelled batch`` iterations (rounded up to whole evaluation
  intervals);
- **records**: each finished run's config, ``metrics.jsonl`` and status, and each detector's log, are copied to
  ``benchmarks/results/realistic_runs/`` (committed; checkpoints are not), with the commit, the CPU model and its
  AVX-512 / bf16 / AMX flags, the precision and the threads of every invocation that trained it
  (``provenance.jsonl`` of the split's folder);
- **one precision per pair**: the config trains with bf16 autocast; ``--fp32`` trains float32 steps (for a CPU
  without native bf16, where bf16 is slower) into folders of their own (``1_32_fp32``), and a paired difference only
  pairs runs of one precision;
- **a protocol version** (:data:`PROTOCOL`): the runs of this one go to ``bench_out/realistic_v3`` and
  ``benchmarks/results/realistic.{json,md}`` / ``realistic_runs/``; the second protocol's (before the data-pipeline
  fix that aligned masks with their images) are kept as ``realistic_v2.{json,md}`` / ``realistic_v2_runs/``, the
  first's as ``realistic_v1.{json,md}``; no run of one is reused in another.

Runs go to ``--out`` (default ``bench_out/realistic_v3``), two at a time with one thread each; every call reuses the
finished runs and resumes unfinished ones, so the benchmark can be stopped and continued at any point. The finished
runs' records are copied into the archive every few minutes while a call trains (and after it), ready to commit;
archived runs are put back into ``--out`` when missing, so a fresh checkout continues where the committed results
stop. ``hafis compare`` runs from the repository with repository-relative paths, so records and reports name no
machine's folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from hafis.config import load_config
from hafis.engine.compare.report import mean_std, paired_interval

ROOT = Path(__file__).resolve().parents[1]
#: the protocol's version, in the default output folder (``bench_out/NAME_vPROTOCOL``), so that a checkout's runs of an
#: earlier protocol are never reused: 3 = the data pipeline with masks aligned with their images
PROTOCOL = 3
CONFIG = ROOT / "configs" / "realistic" / "base.yaml"
RESULTS = ROOT / "benchmarks" / "results"
#: the finished runs' records (config, metrics, status; detector logs) of the CPU preset, committed so that a fresh
#: checkout resumes (each preset has its own: :attr:`Preset.archive`)
ARCHIVE = RESULTS / "realistic_runs"
RECORDS = ("config.yaml", "metrics.jsonl", "compare_run.json")
DETECTOR_RECORDS = ("detect.log",)
POOL = 2000  # data.garments.num_train of the config
SPLITS = {"1_32": POOL // 32, "1_8": POOL // 8}
#: the seed of every split's labelled draw (data.garments.split_seed), fixed for all arms and seeds
SPLIT_SEED = 0
#: unlabelled images per labelled one (the pool is cut down to this to afford many passes)
UNLABELLED_PER_LABELLED = 15
EVALS = 20  # evaluations per run (1/4 and 1/2 of the schedule are evaluation points)
#: seconds between two copies of the finished runs' records while a ``hafis compare`` call trains
ARCHIVE_EVERY = 300
#: the folder suffix of float32 runs (``--fp32``)
FP32 = "_fp32"
#: the folders of the benchmark's splits, in the report's order
FOLDERS = ("1_32", "1_32_x2", "1_8", "full")


@dataclass(frozen=True)
class Preset:
    """One machine's version of the benchmark: its overrides of the config, the unlabelled batch they set (the
    schedule counts passes with it), the default passes, seeds and parallel runs, and the stem of its folders and
    result files (``bench_out/NAME``, ``benchmarks/results/NAME.{json,md}``, ``benchmarks/results/NAME_runs``)."""

    name: str
    overrides: str
    unlabelled_batch: int
    passes: float
    seeds: str
    jobs: int
    #: CPU threads of each run (None: the cores shared out by ``hafis compare``)
    threads: Optional[int] = None
    #: the seeds of the arms beyond the core and the convergence check (the mean-teacher arms, fully supervised, the
    #: second split); None: :attr:`seeds`
    more_seeds: Optional[str] = None

    @property
    def archive(self) -> Path:
        return RESULTS / f"{self.name}_runs"


PRESETS = {
    # 2 CPU cores, one thread per run: configs/realistic/base.yaml as it is
    "cpu": Preset("realistic", "", 4, 20.0, "0,1,2,3,4", 2, threads=1, more_seeds="0,1,2"),
    # one H100-class GPU: 128 px images, the 10 garment classes, a wider decoder, batches of 16, twice the passes
    "gpu": Preset("realistic_gpu", "train.device=cuda data.garments.image_size=128 data.crop_size=128 "
                  "data.garments.classes=fine model.feature_dim=256 model.aspp_channels=256 train.batch_size=16 "
                  "train.unlabelled_batch_size=16 data.num_workers=4", 16, 40.0, "0,1,2", 1),
}

PAPER = "weighting.enabled=true weighting.offset=0 weighting.normalize=count"
AUTHORS = "weighting.enabled=true weighting.offset=1 weighting.normalize=weight"
ARMS = {
    "supervised": "train.framework=supervised",
    "unimatch": "train.framework=unimatch",
    "unimatch+W": f"train.framework=unimatch {PAPER}",
    "unimatch+W(authors)": f"train.framework=unimatch {AUTHORS}",
    # the weighting's controls (docs/method.md, 5): each one key away from unimatch+W(authors)
    "unimatch+W(authors,shuffled)": f"train.framework=unimatch {AUTHORS} weighting.shuffle=true",
    "unimatch+confidence-weight(authors)": f"train.framework=unimatch {AUTHORS} weighting.signal=confidence",
    "unimatch+W(authors,confidence-bank)": f"train.framework=unimatch {AUTHORS} weighting.reliable=confidence",
    "unimatch+W(paper,weight-normalised)": "train.framework=unimatch weighting.enabled=true weighting.offset=0 "
                                           "weighting.normalize=weight",
    **{arm: f"train.framework={fw}{form}" for fw in ("augseg", "u2pl", "ael")
       for arm, form in ((fw, ""), (f"{fw}+W", f" {PAPER}"), (f"{fw}+W(authors)", f" {AUTHORS}"))},
}
CORE = ("supervised", "unimatch", "unimatch+W", "unimatch+W(authors)")
CONTROLS = ("unimatch+W(authors,shuffled)", "unimatch+confidence-weight(authors)",
            "unimatch+W(authors,confidence-bank)", "unimatch+W(paper,weight-normalised)")
#: the mean-teacher frameworks of stage ``evidence``, each bare, with the paper's W and with the authors', in order
FRAMEWORK_ARMS = tuple((fw, f"{fw}+W", f"{fw}+W(authors)") for fw in ("augseg", "u2pl", "ael"))
#: the arms of stage ``all`` (the second protocol's) beyond the core
MORE = ("augseg", "augseg+W")
#: the detector of the weighting arms, chosen on its own box precision and recall on held-out labelled images
#: (benchmarks/detector_tuning.py): an ImageNet EfficientNet-Lite0 trunk, Adam; its schedule is counted in epochs
#: over the labelled images, so it scales with the split
DETECTOR = {"arch": "efficientnet_lite0", "lr": 3e-4, "batch_size": 8}
DETECTOR_EPOCHS = 100
#: the supervised arm trained twice as long on the smallest split (folder 1_32_x2): is 20 passes its plateau?
LONG = "supervised (2x schedule)"
#: (arm, compared with): the semi-supervised effect, the weighting's effect in each framework, the headroom, the
#: convergence check and UniMatch against the supervised arm at its plateau
CONTRASTS = [("unimatch", "supervised"), ("unimatch+W", "unimatch"), ("unimatch+W(authors)", "unimatch"),
             # the controls against the form they change and against no weighting; W(paper, weight-normalised)
             # against W(paper) too: the normaliser's share of W(authors) − W(paper), the offset's is the rest
             *((arm, base) for arm in CONTROLS for base in ("unimatch+W(authors)", "unimatch")),
             ("unimatch+W(paper,weight-normalised)", "unimatch+W"),
             *(pair for fw, w, authors in FRAMEWORK_ARMS
               for pair in ((fw, "supervised"), (w, fw), (authors, fw))),
             ("fully-supervised", "supervised"), (LONG, "supervised"), ("unimatch", LONG)]


def schedule(labelled: int, passes: float, unlabelled_batch: int = 4) -> dict:
    """The unlabelled set and the iterations of a split with ``labelled`` images: ``passes`` over the unlabelled
    set, rounded up to :data:`EVALS` whole evaluation intervals."""
    unlabelled = min(POOL - labelled, UNLABELLED_PER_LABELLED * labelled)
    interval = max(1, math.ceil(passes * max(unlabelled, 1) / unlabelled_batch / EVALS))
    iterations = interval * EVALS
    return {"labelled": labelled, "unlabelled": unlabelled, "iterations": iterations, "eval_interval": interval,
            "passes": iterations * unlabelled_batch / unlabelled if unlabelled else 0.0}


def split_overrides(labelled: int, sched: dict) -> str:
    """The ``--set`` overrides of a split with ``labelled`` images trained on the schedule ``sched``."""
    unlabelled = min(POOL - labelled, sched["unlabelled"])
    return (f"data.garments.num_labelled={labelled} data.garments.num_unlabelled={unlabelled} "
            f"data.garments.split_seed={SPLIT_SEED} train.iterations={sched['iterations']} "
            f"train.eval_interval={sched['eval_interval']}")


def detector_overrides(labelled: int) -> str:
    """The detector recipe of a split with ``labelled`` images: :data:`DETECTOR`, :data:`DETECTOR_EPOCHS` epochs."""
    iterations = DETECTOR_EPOCHS * math.ceil(labelled / DETECTOR["batch_size"])
    return " ".join([*(f"detector.{k}={v}" for k, v in DETECTOR.items()), f"detector.iterations={iterations}"])


class Call(NamedTuple):
    """One ``hafis compare`` call of the benchmark: its folder under ``--out``, arms, ``--set`` overrides and seeds."""

    folder: str
    arms: list[str]
    common: str
    seeds: str


def plan(stage: str, passes: float, preset: Preset = PRESETS["cpu"]) -> list[Call]:
    """The ``hafis compare`` calls of a stage, core runs first. The fully supervised arm trains on the whole pool on
    the smallest split's schedule; stage ``convergence`` trains the supervised arm of the smallest split on twice its
    schedule (folder ``1_32_x2``), to see whether the schedule is its plateau. Stage ``evidence`` trains the smallest
    split's UniMatch arms (the core and :data:`CONTROLS`), then each of :data:`FRAMEWORK_ARMS` in turn. The core arms,
    the controls and the convergence check run :attr:`Preset.seeds`, the others :attr:`Preset.more_seeds`."""
    def split(labelled: int, sched: dict) -> str:
        return " ".join(filter(None, [preset.overrides, split_overrides(labelled, sched)]))

    seeds, more = preset.seeds, preset.more_seeds or preset.seeds
    small = schedule(SPLITS["1_32"], passes, preset.unlabelled_batch)
    core = split(SPLITS["1_32"], small)
    if stage == "calibrate":
        return [Call("1_32", ["supervised", "unimatch"], core, "0")]
    if stage == "core":
        return [Call("1_32", list(CORE), core, seeds)]
    if stage == "evidence":
        return [Call("1_32", [*CORE, *CONTROLS], core, seeds),
                *(Call("1_32", list(arms), core, more) for arms in FRAMEWORK_ARMS)]
    long = Call("1_32_x2", ["supervised"], split(SPLITS["1_32"], schedule(SPLITS["1_32"], 2 * passes,
                                                                           preset.unlabelled_batch)), seeds)
    if stage == "convergence":
        return [long]
    return [Call("1_32", list(CORE), core, seeds), long,
            Call("1_32", list(MORE), core, more),
            Call("full", ["fully-supervised"], split(POOL, small), more),
            Call("1_8", [*CORE, *MORE], split(SPLITS["1_8"], schedule(SPLITS["1_8"], passes,
                                                                    preset.unlabelled_batch)), more)]


def in_fp32(calls: list[Call]) -> list[Call]:
    """The calls with float32 steps (``train.amp=off``), each into a folder of its own (``NAME_fp32``), so that no
    run of one precision is reused, reported or paired as a run of the other."""
    return [call._replace(folder=f"{call.folder}{FP32}", common=f"{call.common} train.amp=off") for call in calls]


def merged(calls: list[Call]) -> list[Call]:
    """One call per folder with the arms and seeds of all the calls into it (in order): the report of a folder
    covers every arm that trains there."""
    by: dict[str, Call] = {}
    for call in calls:
        prev = by.get(call.folder)
        if prev is None:
            by[call.folder] = call._replace(arms=list(call.arms))
            continue
        if prev.common != call.common:
            raise ValueError(f"folder {call.folder}: calls with different overrides")
        by[call.folder] = prev._replace(arms=list(dict.fromkeys(prev.arms + call.arms)),
                                        seeds=",".join(dict.fromkeys(prev.seeds.split(",") + call.seeds.split(","))))
    return list(by.values())


def arm_overrides(name: str, common: str = "") -> str:
    """An arm's overrides; an arm whose weighting needs the detector (the detector-verified bank) also gets the
    detector recipe of its split (the labelled images of ``common``), set on those arms only so that the other arms'
    configs do not change with it."""
    if name == "fully-supervised":
        return ARMS["supervised"]
    if "weighting.enabled=true" not in ARMS[name] or "weighting.reliable=confidence" in ARMS[name]:
        return ARMS[name]
    labelled = int(re.search(r"data\.garments\.num_labelled=(\d+)", common).group(1))
    return f"{ARMS[name]} {detector_overrides(labelled)}"


def compare(folder: str, arms: list[str], common: str, seeds: str, jobs: int, out: Path, report_only: bool,
            threads: Optional[int] = None, archive_to: Optional[Path] = None) -> int:
    """One ``hafis compare`` call, run from the repository with its paths relative to it where they lie inside
    (so that the records and reports name no machine's folders); ``report_only``: its report of the planned runs
    that finished, training none; ``archive_to``: the finished runs' records are copied there every
    :data:`ARCHIVE_EVERY` seconds while it trains, so that each run's records can be committed once it finishes."""
    command = [sys.executable, "-m", "hafis", "compare", str(_relative(CONFIG)), "--seeds", seeds, "--jobs",
               str(jobs), "--out", str(_relative(out / folder)), *(["--threads", str(threads)] if threads else []),
               *(["--report-only"] if report_only else []), "--set", *common.split()]
    for name in arms:
        command += ["--arm", f"{name}: {arm_overrides(name, common)}"]
    print("$", shlex.join(command), flush=True)
    proc = subprocess.Popen(command, cwd=ROOT)
    while True:
        try:
            return proc.wait(timeout=ARCHIVE_EVERY if archive_to is not None else None)
        except subprocess.TimeoutExpired:
            archive(out, archive_to)


def _relative(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


#: what the archive keeps of an invocation for each run it trained (older invocations lack the newer keys)
PROVENANCE_KEYS = ("time", "commit", "cpu", "cores", "avx512", "bf16", "avx512_bf16", "amx_bf16", "torch",
                   "precision", "threads")


def provenance() -> dict:
    """The code and the machine of this invocation: commit (``+dirty`` when the checkout has uncommitted changes),
    CPU model, its ISA flags (AVX-512; native bf16: ``bf16`` = AVX512-BF16 or AMX-BF16, and each), torch."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    # the results this script writes do not count: only a change to the code or the configs makes a run "+dirty"
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"):
        commit += "+dirty"
    cpu, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.+)", text).group(1).split())
    except (OSError, AttributeError):
        pass
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "cpu": cpu,
            "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "torch": torch_version()}


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def archive(out: Path, target: Path) -> int:
    """Copy the records of every finished run (its metrics end with an evaluation at the last iteration), of every
    trained detector (its log) and each split's provenance into ``target``; returns how many runs are archived."""
    count = 0
    for metrics in sorted(out.glob("*/runs/*/seed_*/metrics.jsonl")):
        run = metrics.parent
        config = yaml.safe_load((run / "config.yaml").read_text())
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
        if not evals or evals[-1]["iteration"] != config["train"]["iterations"]:
            continue
        archived = target / run.relative_to(out)
        if not (archived / "provenance.json").is_file():
            # the invocations that planned this run up to now (it finished in the last of them)
            lines = (run.parents[2] / "provenance.jsonl").read_text().splitlines() \
                if (run.parents[2] / "provenance.jsonl").is_file() else []
            seed = int(run.name.removeprefix("seed_"))
            planned = [p for p in map(json.loads, lines)
                       if seed in map(int, p["seeds"].split(",")) and run.parent.name in
                       set(map(slug, p["arms"]))]
            archived.mkdir(parents=True, exist_ok=True)
            (archived / "provenance.json").write_text(json.dumps(
                [{k: p[k] for k in PROVENANCE_KEYS if k in p} for p in planned], indent=1) + "\n")
        _copy(run, archived, RECORDS)
        count += 1
    for detector in sorted(out.glob("*/detectors/*/detector.pt")):
        _copy(detector.parent, target / detector.parent.relative_to(out), DETECTOR_RECORDS)
    for path in sorted(out.glob("*/provenance.jsonl")):
        _merge_lines(path, target / path.relative_to(out))
    return count


def _merge_lines(source: Path, target: Path) -> None:
    """``target`` gets the lines of ``source`` it lacks, in time order: a checkout whose copy is older (or newer)
    than the other never drops an invocation's record."""
    lines = target.read_text().splitlines() if target.is_file() else []
    new = [line for line in source.read_text().splitlines() if line.strip() and line not in lines]
    if new or not target.is_file():
        merged = sorted(lines + new, key=lambda line: json.loads(line).get("time", ""))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in merged))


def _copy(source: Path, target: Path, names) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def restore(out: Path, source: Path) -> None:
    """Put archived runs that ``out`` lacks back, so ``hafis compare`` reuses them instead of training them again."""
    for config in source.glob("*/runs/*/seed_*/config.yaml"):
        run = out / config.parent.relative_to(source)
        if not (run / "metrics.jsonl").is_file():
            _copy(config.parent, run, RECORDS)
    for path in source.glob("*/provenance.jsonl"):
        _merge_lines(path, out / path.relative_to(source))


def collect(out: Path, command: str, stem: str = "realistic",
            archived: Path = ARCHIVE) -> tuple[dict, list[str], dict]:
    """One results file for the whole benchmark: every finished run of every split (and of its float32 folder), in
    the issue's schema; the folders' reports as sections; and the figure of the UniMatch arms of each 1/32 folder,
    by ``(labelled, precision)``."""
    runs, machine, sections, figures = [], "", [], {}
    for folder in (name + suffix for name in FOLDERS for suffix in ("", FP32)):
        path = out / folder / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        machine = data.get("machine", machine)
        rows = [{**row, **run_fields(out / folder, archived / folder, row)} for row in data["runs"]]
        split = folder.removesuffix(FP32)
        if split == "1_32_x2":  # its own arm in the tables of the split
            rows = [{**row, "arm": LONG} for row in rows]
        runs += rows
        name = f"{stem}_{folder}_unimatch_arms_miou.png"
        if split == "1_32" and plot_arms(rows, [*CORE, *CONTROLS], RESULTS / name):
            figures[(SPLITS["1_32"], rows[0]["precision"])] = name
        report = (out / folder / "report.md").read_text()
        for plot in ("miou.png", "diagnostics.png"):
            if (out / folder / plot).is_file():
                shutil.copyfile(out / folder / plot, RESULTS / f"{stem}_{folder}_{plot}")
            report = report.replace(f"({plot})", f"({stem}_{folder}_{plot})")
        title = {"full": "fully supervised", "1_32_x2": "supervised on split 1/32, twice the schedule"}.get(
            split, f"split {split.replace('_', '/')}") + (", float32 steps" if folder != split else "")
        sections.append(f"## The runs of {title} (`hafis compare` report)\n\n" + report.split("\n", 1)[1])
        detectors = RESULTS / f"detector_unlabelled_{folder}.md"  # benchmarks/detector_tuning.py --evaluate
        if stem == "realistic" and detectors.is_file():
            sections.append(f"### The detectors of {title} on its unlabelled images\n\n"
                            + detectors.read_text().split("\n", 1)[1])
    return {"command": command, "machine": machine, "runs": runs}, sections, figures


def split_arms(text: str) -> list[str]:
    """``--arms``: arm names separated by commas outside parentheses (``unimatch+W(authors,shuffled)`` is one)."""
    return [name.strip() for name in re.split(r",(?![^()]*\))", text) if name.strip()]


def slug(arm: str) -> str:
    """An arm's folder name as ``hafis compare`` names it: anything but ``[A-Za-z0-9._+-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", arm)


def run_fields(folder: Path, archived: Path, row: dict) -> dict:
    """The protocol's fields of one finished run, from its folder: unlabelled images, passes over them, the split
    seed, the precision of its steps (``train.amp``), the mIoU at every evaluation (``miou_at``), the IoU per class
    at the end (``iou_by_class``) and the code and machine that trained it (``provenance``)."""
    run = folder / "runs" / slug(row["arm"]) / f"seed_{row['seed']}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    garments, train = config["data"]["garments"], config["train"]
    unlabelled = garments["num_unlabelled"]
    if unlabelled is None:
        unlabelled = garments["num_train"] - garments["num_labelled"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    evals = [e for e in evals if e.get("event") == "eval"]
    final = [e for e in evals if e["iteration"] == train["iterations"]]
    prov = archived / run.relative_to(folder) / "provenance.json"
    return {"unlabelled": unlabelled,
            "passes": train["iterations"] * train["unlabelled_batch_size"] / unlabelled if unlabelled else 0.0,
            "split_seed": garments["seed"] if garments["split_seed"] is None else garments["split_seed"],
            "precision": train.get("amp"),
            "miou_at": {str(e["iteration"]): e["miou"] for e in evals},
            "iou_by_class": final[-1].get("iou_by_class") if final else None,
            "provenance": json.loads(prov.read_text()) if prov.is_file() else []}


def miou_at(run: dict, fraction: float) -> Optional[float]:
    """The run's mIoU at the last evaluation at or before ``fraction`` of its schedule."""
    points = [(int(i), m) for i, m in run.get("miou_at", {}).items() if int(i) <= fraction * run["iterations"]]
    return max(points)[1] if points else None


def plot_arms(runs: list[dict], arms: list[str], path: Path) -> bool:
    """Validation mIoU against iteration of ``arms``: the mean over seeds (line) and min..max over them (band);
    False (nothing written) when none of them has a run."""
    from hafis.extras import require

    Figure = require("matplotlib.figure", "viz", "the benchmark's figures").Figure
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for arm in arms:
        curves = [r["miou_at"] for r in runs if r["arm"] == arm and r.get("miou_at")]
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
    ax.set_title("UniMatch arms: mean over seeds, band = min..max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


#: the final evaluation's diagnostics in the benchmark's table: (key, heading, percent?)
FINAL_DIAGNOSTICS = [("auroc_weight", "AUROC W", False), ("auroc_weight_within_class", "AUROC W within class", False),
                     ("auroc_confidence", "AUROC conf", False),
                     ("auroc_confidence_within_class", "AUROC conf within class", False),
                     ("bank_detector_precision", "bank precision: detector %", True),
                     ("bank_confidence_precision", "bank precision: confidence %", True)]


def per_arm_tables(rows: list[dict], arms: list[str]) -> list[str]:
    """Per arm, over its finished seeds: the IoU of every class at the end (mean ± std), and the final evaluation's
    pseudo-label diagnostics (mean): AUROC of W and of the confidence, pooled and within a class, the bank's
    precision by rule, and the mean W of each pseudo-label class."""
    classes = next((list(r["iou_by_class"]) for r in rows if r.get("iou_by_class")), [])
    lines = []
    if classes:
        lines += ["IoU per class (%, final evaluation, mean ± std over seeds):", "",
                  "| arm | n | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for arm in arms:
            got = [r["iou_by_class"] for r in rows if r["arm"] == arm and r.get("iou_by_class")]
            if got:
                cells = []
                for c in classes:
                    m, sd = mean_std([100 * g[c] for g in got])
                    cells.append(f"{m:.1f} ± {sd:.1f}" if sd is not None else f"{m:.1f}")
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
                if not values:
                    cells.append("–")
                else:
                    m = statistics.fmean(values)
                    cells.append(f"{100 * m:.1f}" if pct else f"{m:.{digits}f}")
            lines.append(f"| {arm} | {len(diag[arm])} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def headline(runs: list[dict], figures: Optional[dict] = None) -> list[str]:
    """Per split and precision: mean ± std of final and best mIoU per arm, the paired differences of
    :data:`CONTRASTS` with 95 % t intervals over the seeds both arms finished (the fully supervised arm pairs with
    every split's runs of its precision; runs of two precisions never pair), the IoU per class and the final
    diagnostics (:func:`per_arm_tables`), and the figure of the group's UniMatch arms (``figures``)."""
    by: dict = {}
    for r in runs:
        by.setdefault(r["arm"], {})[(r["labelled"], r.get("precision"), r["seed"])] = r
    full = {(precision, seed): r for (n, precision, seed), r in by.get("fully-supervised", {}).items()}
    seeds = sorted({r["seed"] for r in runs})
    order = [*ARMS, LONG, "fully-supervised"]
    lines = []
    groups = sorted({(r["labelled"], r.get("precision")) for r in runs if r["arm"] != "fully-supervised"},
                    key=lambda g: (g[0], g[1] == "off", str(g[1])))
    for labelled, precision in groups:
        def get(arm, seed):
            return full.get((precision, seed)) if arm == "fully-supervised" else \
                by.get(arm, {}).get((labelled, precision, seed))

        steps = " (float32 steps)" if precision == "off" else f" ({precision} steps)" if precision else ""
        lines += [f"**{labelled} labelled images** of {POOL}{steps} (final / best mIoU %, mean ± std over seeds, n; "
                  "last quarter = final mIoU minus the mIoU at 3/4 of the schedule, near 0 when converged):", "",
                  "| arm | n | final mIoU | best mIoU | last quarter |", "|---|---|---|---|---|"]
        for arm in order:
            rows = [r for seed in seeds if (r := get(arm, seed)) is not None]
            if rows:
                cells = []
                for key, sign in (("miou", ""), ("best_miou", ""), ("last_quarter_change", "+")):
                    values = [100 * r[key] for r in rows if r.get(key) is not None]
                    if not values:
                        cells.append("–")
                        continue
                    m, sd = mean_std(values)
                    cells.append(f"{m:{sign}.1f} ± {sd:.1f}" if sd is not None else f"{m:{sign}.1f}")
                lines.append(f"| {arm} | {len(rows)} | {' | '.join(cells)} |")
        lines += ["", "Paired differences (mIoU points, mean and 95 % t interval over the seeds both arms finished) "
                  "at 1/4 and 1/2 of the schedule, at its end and of the best evaluation:", "",
                  "| paired difference | n | Δ at 1/4 | Δ at 1/2 | Δ final | Δ best |", "|---|---|---|---|---|---|"]
        for arm, base in CONTRASTS:
            pairs = [(a, b) for seed in seeds if (a := get(arm, seed)) and (b := get(base, seed))]
            if not pairs:
                continue
            cells = []
            for key in (0.25, 0.5, "miou", "best_miou"):
                if isinstance(key, float):
                    diffs = [(x, y) for a, b in pairs
                             if (x := miou_at(a, key)) is not None and (y := miou_at(b, key)) is not None]
                else:
                    diffs = [(a[key], b[key]) for a, b in pairs]
                if not diffs:
                    cells.append("–")
                    continue
                m, ci = paired_interval([100 * (x - y) for x, y in diffs])
                cells.append(f"{m:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})" if ci else f"{m:+.1f} (n = 1)")
            lines.append(f"| {arm} − {base} | {len(pairs)} | {' | '.join(cells)} |")
        lines.append("")
        lines += per_arm_tables([r for arm in order for seed in seeds if (r := get(arm, seed)) is not None], order)
        figure = (figures or {}).get((labelled, precision))
        if figure:
            lines += [f"![the UniMatch arms' mIoU against iteration]({figure})", "",
                      f"`{figure}`: the UniMatch arms' validation mIoU against iteration, mean over seeds (line) and "
                      "min..max over them (band).", ""]
    return lines


def mechanism(stem: str) -> list[str]:
    """The report's paragraph on what the controls say about the mechanism: ``benchmarks/results/STEM_mechanism.md``
    (written by hand once the runs are in, so that a rebuilt report keeps it), or a placeholder naming that file."""
    path = RESULTS / f"{stem}_mechanism.md"
    text = path.read_text().strip() if path.is_file() else \
        (f"*To be written once the runs of `--stage evidence` have finished, in `benchmarks/results/{path.name}`: "
         "what the four controls say about why the weighting helps where it helps.*")
    return ["## What the controls say about the mechanism", "", text, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("calibrate", "core", "convergence", "evidence", "all"), default="core")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated, for every call of the stage (default: 0 for calibrate; the preset's "
                             "seeds for the core arms, the controls and the convergence check, its more_seeds for "
                             "the others)")
    parser.add_argument("--more-seeds", default=None,
                        help="comma-separated: the seeds of the arms beyond the core, the controls and the "
                             "convergence check (augseg, u2pl, ael, fully supervised, 1/8; default: --seeds, else "
                             "the preset's more_seeds: cpu 0,1,2)")
    parser.add_argument("--arms", default=None,
                        help="comma-separated: only these arms of the stage (e.g. two processes, one per arm group; "
                             "a comma inside an arm's parentheses is part of its name)")
    parser.add_argument("--passes", type=float, default=None, help="passes over the unlabelled set (cpu: 20, gpu: 40)")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (cpu: 2, gpu: 1)")
    parser.add_argument("--device", default=None, help="train.device of every run (to try the gpu preset on a CPU)")
    parser.add_argument("--fp32", action="store_true",
                        help="float32 steps (train.amp=off) into folders of their own (1_32_fp32, ...), for a CPU "
                             "without native bf16; pairs are made within one precision only")
    parser.add_argument("--out", type=Path, default=None, help="default: bench_out/NAME_v3 of the preset")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--archive-only", action="store_true", help="copy the finished runs' records and stop")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.device:
        preset = replace(preset, overrides=f"{preset.overrides} train.device={args.device}".strip())
    preset = replace(preset, seeds=args.seeds or preset.seeds,
                     more_seeds=args.more_seeds or args.seeds or preset.more_seeds)
    passes = preset.passes if args.passes is None else args.passes
    out = args.out or ROOT / "bench_out" / f"{preset.name}_v{PROTOCOL}"
    if args.archive_only:
        print(f"{archive(out, preset.archive)} finished runs' records in {preset.archive}")
        return 0
    planned = plan(args.stage, passes, preset)
    if args.seeds and args.stage == "calibrate":
        planned = [call._replace(seeds=args.seeds) for call in planned]
    if args.fp32:
        planned = in_fp32(planned)
    calls = planned
    if args.arms:
        chosen = split_arms(args.arms)
        unknown = sorted(set(chosen) - {a for call in calls for a in call.arms})
        if unknown:
            parser.error(f"--arms: {', '.join(unknown)} not in stage {args.stage}'s arms")
        calls = [call._replace(arms=[a for a in call.arms if a in chosen]) for call in calls]
        calls = [call for call in calls if call.arms]
    RESULTS.mkdir(parents=True, exist_ok=True)
    restore(out, preset.archive)
    machine = provenance()
    precision = "off" if args.fp32 else load_config(CONFIG, preset.overrides.split()).train.amp
    if precision == "bf16" and not machine["bf16"] and not args.report_only:
        print("warning: this CPU has no native bf16 (AVX512-BF16 / AMX-BF16): bf16 steps are emulated and slower "
              "than float32; --fp32 trains float32 steps into folders of their own", flush=True)
    status = 0
    for folder, arms, common, seeds in ([] if args.report_only else calls):
        (out / folder).mkdir(parents=True, exist_ok=True)
        with open(out / folder / "provenance.jsonl", "a") as fh:
            fh.write(json.dumps({**provenance(), "precision": precision, "threads": preset.threads, "arms": arms,
                                 "seeds": seeds, "set": common}) + "\n")
        status |= compare(folder, arms, common, seeds, args.jobs or preset.jobs, out, False, preset.threads,
                          archive_to=preset.archive)
        archive(out, preset.archive)  # after every call too, so that a session cut short keeps what finished
    # each folder's report: every arm and seed the stage plans there (all of them, whatever --arms trained), of the
    # runs that finished
    for folder, arms, common, seeds in merged(planned):
        if (out / folder / "runs").is_dir():
            compare(folder, arms, common, seeds, 1, out, True, preset.threads)
    command = (f"python benchmarks/realistic.py --preset {args.preset} --stage {args.stage}"
               f"{' --seeds ' + args.seeds if args.seeds else ''}"
               f"{' --more-seeds ' + args.more_seeds if args.more_seeds else ''}"
               f"{' --fp32' if args.fp32 else ''} --passes {passes:g}")
    results, sections, figures = collect(out, command, preset.name, preset.archive)
    (RESULTS / f"{preset.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{preset.name}.md").write_text(
        f"# Realistic benchmark, protocol {PROTOCOL} (garments on photographs, EfficientNet-Lite0 DeepLabV3+)\n\n"
        f"`{results['command']}` on {results['machine']}; settings: `configs/realistic/base.yaml`"
        f"{' with ' + chr(96) + preset.overrides + chr(96) if preset.overrides else ''}; load average "
        f"{os.getloadavg()[0]:.2f} when this report was written. The earlier protocols' runs: "
        "`realistic_v2.md` (before the data-pipeline fix), `realistic_v1.md`.\n\n"
        + "\n".join(headline(results["runs"], figures)) + "\n" + "\n".join(mechanism(preset.name)) + "\n"
        + "\n".join(sections))
    print(f"wrote {RESULTS / (preset.name + '.json')} ({len(results['runs'])} runs) and "
          f"{RESULTS / (preset.name + '.md')}; {archive(out, preset.archive)} finished runs' records in "
          f"{preset.archive}")
    return status


if __name__ == "__main__":
    sys.exit(main())
