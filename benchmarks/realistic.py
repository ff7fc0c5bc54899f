"""The realistic benchmark: does semi-supervised learning work here, and does the weighting add to it?

The plan (protocol and stages: benchmarks/README.md): presets, arms, contrasts and the ``hafis compare`` call of each
folder of a stage (``1_32``, ``1_32_x2``, ``1_8``, ``full``; ``*_fp32`` with ``--fp32``). ``hafis compare`` trains
(resumable), keeps the finished runs' records in ``benchmarks/results/NAME_runs/FOLDER`` (``--records``, committed)
and makes the tables of ``benchmarks/results/NAME.{json,md}`` (:mod:`hafis.engine.compare.join`).

    python benchmarks/realistic.py --stage core   # calibrate, core, convergence, evidence, all; --preset gpu
    python benchmarks/realistic.py --report-only  # the report of the stage's finished runs (archived ones included)
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

from hafis.engine.compare import records
from hafis.engine.compare.join import (
    Call,
    Part,
    figure,
    join,
    merged,
    notes,
    run_compare,
    split_names,
    split_tables,
    write,
)
from hafis.engine.compare.plan import slug
from hafis.engine.compare.plots import plot_curves

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = 3  # in the default output folder, so that no run of an earlier protocol is reused
CONFIG = ROOT / "configs" / "realistic" / "base.yaml"
RESULTS = ROOT / "benchmarks" / "results"
ARCHIVE = RESULTS / "realistic_runs"  # the CPU preset's records (each preset has its own: Preset.archive)
POOL = 2000  # data.garments.num_train of the config
SPLITS = {"1_32": POOL // 32, "1_8": POOL // 8}
SPLIT_SEED = 0  # data.garments.split_seed of every split: one labelled draw for all arms and seeds
UNLABELLED_PER_LABELLED = 15  # the unlabelled set: the next 15 x n images of the same permutation
EVALS = 20  # evaluations per run (1/4 and 1/2 of the schedule are evaluation points)
FP32 = "_fp32"  # the folder suffix of float32 runs
FOLDERS = {"1_32": "split 1/32", "1_32_x2": "supervised on split 1/32, twice the schedule", "1_8": "split 1/8",
           "full": "fully supervised"}  # their sections' titles, in the report's order


@dataclass(frozen=True)
class Preset:
    """One machine's benchmark (more_seeds: of the arms beyond the core, the controls and the convergence check)."""

    name: str
    overrides: str
    unlabelled_batch: int
    passes: float
    seeds: str
    jobs: int
    threads: Optional[int] = None
    more_seeds: Optional[str] = None

    @property
    def archive(self) -> Path:
        return RESULTS / f"{self.name}_runs"


PRESETS = {
    "cpu": Preset("realistic", "", 4, 20.0, "0,1,2,3,4", 2, threads=1, more_seeds="0,1,2"),
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
FRAMEWORK_ARMS = tuple((fw, f"{fw}+W", f"{fw}+W(authors)") for fw in ("augseg", "u2pl", "ael"))  # stage evidence
MORE = ("augseg", "augseg+W")  # stage all, beyond the core
#: the weighting arms' detector (benchmarks/detector_tuning.py), its schedule in epochs over the labelled images
DETECTOR = {"arch": "efficientnet_lite0", "lr": 3e-4, "batch_size": 8}
DETECTOR_EPOCHS = 100
LONG = "supervised (2x schedule)"  # the supervised arm of folder 1_32_x2
#: (arm, compared with): the semi-supervised effect, the weighting's in each framework, each control against the form
#: it changes and no weighting (the normaliser's share of W(authors) − W(paper)), the headroom, the convergence check
CONTRASTS = [("unimatch", "supervised"), ("unimatch+W", "unimatch"), ("unimatch+W(authors)", "unimatch"),
             *((arm, base) for arm in CONTROLS for base in ("unimatch+W(authors)", "unimatch")),
             ("unimatch+W(paper,weight-normalised)", "unimatch+W"),
             *(pair for fw, w, authors in FRAMEWORK_ARMS for pair in ((fw, "supervised"), (w, fw), (authors, fw))),
             ("fully-supervised", "supervised"), (LONG, "supervised"), ("unimatch", LONG)]


def schedule(labelled: int, passes: float, unlabelled_batch: int = 4) -> dict:
    """``passes`` over the unlabelled set of a split with ``labelled`` images, in :data:`EVALS` whole intervals."""
    unlabelled = min(POOL - labelled, UNLABELLED_PER_LABELLED * labelled)
    interval = max(1, math.ceil(passes * max(unlabelled, 1) / unlabelled_batch / EVALS))
    iterations = interval * EVALS
    return {"labelled": labelled, "unlabelled": unlabelled, "iterations": iterations, "eval_interval": interval,
            "passes": iterations * unlabelled_batch / unlabelled if unlabelled else 0.0}


def split_overrides(labelled: int, sched: dict) -> str:
    return (f"data.garments.num_labelled={labelled} data.garments.num_unlabelled="
            f"{min(POOL - labelled, sched['unlabelled'])} data.garments.split_seed={SPLIT_SEED} "
            f"train.iterations={sched['iterations']} train.eval_interval={sched['eval_interval']}")


def plan(stage: str, passes: float, preset: Preset = PRESETS["cpu"], calibrate: str = "0") -> list[Call]:
    """The calls of a stage, core runs first; the convergence check is supervised on twice the schedule."""
    def split(labelled: int, times: float = 1) -> str:
        sched = schedule(labelled, times * passes, preset.unlabelled_batch)
        return " ".join(filter(None, [preset.overrides, split_overrides(labelled, sched)]))

    seeds, more, core = preset.seeds, preset.more_seeds or preset.seeds, split(SPLITS["1_32"])
    long = Call("1_32_x2", ["supervised"], split(SPLITS["1_32"], 2), seeds)
    full = split_overrides(POOL, schedule(SPLITS["1_32"], passes, preset.unlabelled_batch))
    return {"calibrate": [Call("1_32", ["supervised", "unimatch"], core, calibrate)],
            "core": [Call("1_32", list(CORE), core, seeds)],
            "evidence": [Call("1_32", [*CORE, *CONTROLS], core, seeds),
                         *(Call("1_32", list(arms), core, more) for arms in FRAMEWORK_ARMS)],
            "convergence": [long],
            "all": [Call("1_32", list(CORE), core, seeds), long, Call("1_32", list(MORE), core, more),
                    Call("full", ["fully-supervised"], " ".join(filter(None, [preset.overrides, full])), more),
                    Call("1_8", [*CORE, *MORE], split(SPLITS["1_8"]), more)]}[stage]


def in_fp32(calls: list[Call]) -> list[Call]:
    """Float32 steps (``train.amp=off``) into folders of their own: no run is paired across precisions."""
    return [c._replace(folder=f"{c.folder}{FP32}", common=f"{c.common} train.amp=off") for c in calls]


def arm_overrides(name: str, common: str = "") -> str:
    """An arm's overrides; a detector-verified weighting arm also gets :data:`DETECTOR` for its split."""
    arm = ARMS["supervised" if name == "fully-supervised" else name]
    if "weighting.enabled=true" not in arm or "weighting.reliable=confidence" in arm:
        return arm
    labelled = int(re.search(r"data\.garments\.num_labelled=(\d+)", common).group(1))
    steps = DETECTOR_EPOCHS * math.ceil(labelled / DETECTOR["batch_size"])
    return " ".join([arm, *(f"detector.{k}={v}" for k, v in DETECTOR.items()), f"detector.iterations={steps}"])


def compare(folder: str, arms: list[str], common: str, seeds: str, jobs: int, out: Path, report_only: bool,
            threads: Optional[int] = None, archive_to: Optional[Path] = None) -> int:
    """One ``hafis compare`` call of a folder; ``archive_to``: the archive whose ``FOLDER`` gets its records."""
    return run_compare(ROOT, CONFIG, {a: arm_overrides(a, common) for a in arms}, seeds, common.split(), out / folder,
                       jobs, threads, archive_to / folder if archive_to else None, report_only)


def run_fields(folder: Path, row: dict) -> dict:
    """The protocol's fields of a finished run, from its config: unlabelled images, passes over them, split seed."""
    config = yaml.safe_load((folder / "runs" / slug(row["arm"]) / f"seed_{row['seed']}" / "config.yaml").read_text())
    garments, train = config["data"]["garments"], config["train"]
    unlabelled = garments["num_unlabelled"]
    unlabelled = garments["num_train"] - garments["num_labelled"] if unlabelled is None else unlabelled
    return {"unlabelled": unlabelled,
            "passes": train["iterations"] * train["unlabelled_batch_size"] / unlabelled if unlabelled else 0.0,
            "split_seed": garments["seed"] if garments["split_seed"] is None else garments["split_seed"]}


def report(out: Path, stem: str) -> tuple[list[dict], str, list[str]]:
    """The runs of every folder, the machine and the report: compare's tables of :data:`CONTRASTS` per split and
    precision with the UniMatch arms' figure, the mechanism paragraph, each folder's report and its detectors'."""
    parts = []
    for folder in (name + suffix for name in FOLDERS for suffix in ("", FP32)):
        title = FOLDERS[folder.removesuffix(FP32)] + (", float32 steps" if folder.endswith(FP32) else "")
        detectors = RESULTS / f"detector_unlabelled_{folder}.md"  # benchmarks/detector_tuning.py --evaluate
        parts.append(Part(out / folder, folder, title, (detectors, f"The detectors of {title} on its unlabelled "
                                                        "images") if stem == "realistic" else None))
    runs, sections, figures, machine = [], [], {}, ""
    for j in join(parts, RESULTS, stem, lambda part, row: {**run_fields(part.folder, row), **(
            {"arm": LONG} if part.name.startswith("1_32_x2") else {})}):
        runs, machine, sections = runs + j.rows, j.machine, sections + [j.section]
        name = f"{stem}_{j.part.name}_unimatch_arms_miou.png"
        if j.part.name.removesuffix(FP32) == "1_32" and plot_curves(
                j.rows, [*CORE, *CONTROLS], RESULTS / name, "UniMatch arms: mean over seeds, band = min..max"):
            figures[SPLITS["1_32"], j.rows[0]["precision"]] = figure(
                name, "the UniMatch arms' mIoU against iteration", "the UniMatch arms' validation mIoU against "
                "iteration, mean over seeds (line) and min..max over them (band).")
    mechanism = notes(RESULTS / f"{stem}_mechanism.md", "What the controls say about the mechanism",
                      f"*To be written once the runs of `--stage evidence` have finished, in `benchmarks/results/"
                      f"{stem}_mechanism.md`: what the four controls say about why the weighting helps where it "
                      "helps.*")
    tables = split_tables(runs, [*ARMS, LONG, "fully-supervised"], CONTRASTS, POOL, figures)
    return runs, machine, [*tables, *mechanism, *sections]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("calibrate", "core", "convergence", "evidence", "all"), default="core")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--seeds", help="of every call (default: calibrate 0, else the preset's; more_seeds for the others)")
    p.add_argument("--more-seeds", help="of the other arms (default: --seeds, else the preset's more_seeds)")
    p.add_argument("--arms", help="only these arms of the stage, comma-separated")
    p.add_argument("--passes", type=float, help="passes over the unlabelled set (cpu: 20, gpu: 40)")
    p.add_argument("--jobs", type=int, help="runs side by side (cpu: 2, gpu: 1)")
    p.add_argument("--device", help="train.device of every run (to try the gpu preset on a CPU)")
    p.add_argument("--fp32", action="store_true", help="float32 steps into folders of their own (1_32_fp32, ...)")
    p.add_argument("--out", type=Path, help="default: bench_out/NAME_v3 of the preset")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--archive-only", action="store_true", help="copy the finished runs' records and stop")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    preset = replace(preset, seeds=args.seeds or preset.seeds, more_seeds=args.more_seeds or args.seeds or
                     preset.more_seeds, overrides=f"{preset.overrides} train.device={args.device}".strip()
                     if args.device else preset.overrides)
    passes = preset.passes if args.passes is None else args.passes
    out = args.out or ROOT / "bench_out" / f"{preset.name}_v{PROTOCOL}"
    if args.archive_only:
        print(f"{records.archive_all(out, preset.archive)} finished runs' records in {preset.archive}")
        return 0
    planned = plan(args.stage, passes, preset, args.seeds or "0")
    planned = in_fp32(planned) if args.fp32 else planned
    chosen = split_names(args.arms) if args.arms else [a for c in planned for a in c.arms]
    if unknown := sorted(set(chosen) - {a for c in planned for a in c.arms}):
        p.error(f"--arms: {', '.join(unknown)} not in stage {args.stage}'s arms")
    status = 0
    for folder, arms, common, seeds in ([] if args.report_only else planned):
        if arms := [a for a in arms if a in chosen]:
            status |= compare(folder, arms, common, seeds, args.jobs or preset.jobs, out, False, preset.threads,
                              archive_to=preset.archive)
    for folder, arms, common, seeds in merged(planned):  # each folder's report: every arm and seed planned there
        records.restore(out / folder, preset.archive / folder)
        if (out / folder / "runs").is_dir():
            compare(folder, arms, common, seeds, 1, out, True, preset.threads, archive_to=preset.archive)
    command = (f"python benchmarks/realistic.py --preset {args.preset} --stage {args.stage}"
               f"{' --seeds ' + args.seeds if args.seeds else ''}"
               f"{' --more-seeds ' + args.more_seeds if args.more_seeds else ''}"
               f"{' --fp32' if args.fp32 else ''} --passes {passes:g}")
    runs, machine, lines = report(out, preset.name)
    write(RESULTS, preset.name, runs, command, machine, f"Realistic benchmark, protocol {PROTOCOL} (garments on "
          "photographs, EfficientNet-Lite0 DeepLabV3+)", lines, "; settings: `configs/realistic/base.yaml`"
          + (f" with `{preset.overrides}`" if preset.overrides else "") + ". The earlier protocols' runs: "
          "`realistic_v2.md` (before the data-pipeline fix), `realistic_v1.md`.")
    print(f"wrote {RESULTS / preset.name}.{{json,md}} ({len(runs)} runs); the records: {preset.archive}")
    return status


if __name__ == "__main__":
    sys.exit(main())
