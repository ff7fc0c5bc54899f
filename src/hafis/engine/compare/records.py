"""A comparison's records (``hafis compare --records DIR``): what it keeps of its finished runs, with the code and the
machine that trained them, in a folder meant to be committed; and the runs put back from there.

Every invocation that trains appends one line to ``OUT/provenance.jsonl`` (:func:`provenance`: the commit, ``+dirty``
when the code that trains has uncommitted changes, the CPU model and its AVX-512 / bf16 flags, torch; the precision,
threads, arms, seeds and common overrides of the invocation). :func:`archive` copies into ``DIR`` the records of every
finished run (:data:`RECORDS`, and ``provenance.json``: the invocations that planned it, the last of which finished
it), each detector's log and the provenance lines; checkpoints never. :func:`restore` puts the archived runs that
``OUT`` lacks back, so that a fresh checkout reuses them instead of training them again. The layout of ``DIR``
mirrors ``OUT`` (``runs/ARM/seed_S/``, ``detectors/KEY/``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from hafis.files import atomic_write

from .plan import slug
from .runs import final_eval, read_records

__all__ = ["RECORDS", "DETECTOR_RECORDS", "PROVENANCE", "RUN_PROVENANCE", "PROVENANCE_KEYS", "archive", "archive_all",
           "checkout", "code_paths", "finished", "merge_lines", "provenance", "record_invocation", "restore"]

#: what the archive keeps of a finished run
RECORDS = ("config.yaml", "metrics.jsonl", "compare_run.json")
#: what it keeps of a trained detector
DETECTOR_RECORDS = ("detect.log",)
#: one line per invocation that trained, in the comparison's folder
PROVENANCE = "provenance.jsonl"
#: the invocations that planned a run, in its archived folder
RUN_PROVENANCE = "provenance.json"
#: what a run's provenance keeps of each invocation (lines written by older code may lack some)
PROVENANCE_KEYS = ("time", "commit", "cpu", "cores", "avx512", "bf16", "avx512_bf16", "amx_bf16", "torch",
                   "precision", "threads")


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def provenance(root: Path, code: Sequence[Path]) -> dict:
    """The code and the machine of this invocation: the commit of the checkout ``root`` (``+dirty`` when a tracked
    file under ``code`` has uncommitted changes: what results the runs write elsewhere does not count), the CPU
    model, its ISA flags (AVX-512; native bf16: ``bf16`` = AVX512-BF16 or AMX-BF16, and each), torch."""
    from importlib.metadata import version

    from hafis.precision import CPU_BF16_FLAGS, CPUINFO, cpu_flags

    commit = _git(root, "rev-parse", "HEAD") or "unknown"
    inside = [str(p) for p in code if Path(p).resolve().is_relative_to(Path(root).resolve())]
    if inside and _git(root, "status", "--porcelain", "--untracked-files=no", "--", *inside):
        commit += "+dirty"
    cpu, flags = platform.processor() or "unknown", cpu_flags() or frozenset()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path(CPUINFO).read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "cpu": cpu,
            "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "bf16": bool(flags & set(CPU_BF16_FLAGS)), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "torch": version("torch")}


def checkout() -> Path:
    """The git checkout this hafis runs from (its package folder when it is not in one)."""
    import hafis

    package = Path(hafis.__file__).resolve().parent
    return Path(_git(package, "rev-parse", "--show-toplevel") or package)


def code_paths(config: Path) -> list[Path]:
    """What trains a comparison's runs: the hafis package and the config file with its ``base:`` chain (the arms'
    overrides are in each run's ``config.yaml``)."""
    import hafis

    paths, path = [Path(hafis.__file__).resolve().parent], Path(config).resolve()
    while path.is_file() and path not in paths:
        paths.append(path)
        try:
            base = (yaml.safe_load(path.read_text()) or {}).get("base")
        except (OSError, yaml.YAMLError, AttributeError):
            break
        if not isinstance(base, str):
            break
        path = (path.parent / base).resolve()
    return paths


def record_invocation(out: Path, machine: dict, precision: Optional[str], threads: Optional[int],
                      arms: Sequence[str], seeds: Sequence[int], common: Sequence[str]) -> None:
    """Append this invocation's line to ``out/provenance.jsonl``."""
    line = {**machine, "precision": precision, "threads": threads, "arms": list(arms),
            "seeds": ",".join(map(str, seeds)), "set": " ".join(common)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PROVENANCE, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def finished(run_dir: Path) -> bool:
    """The comparison's rule: the run's records hold the evaluation at the last iteration of its config."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        iterations = config["train"]["iterations"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return final_eval(read_records(run_dir), iterations) is not None


def _copy(source: Path, target: Path, names: Sequence[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).is_file():
            atomic_write(target / name, (source / name).read_bytes())


def merge_lines(source: Path, target: Path) -> None:
    """``target`` gets the lines of ``source`` it lacks, in time order: a checkout whose copy is older (or newer)
    than the other never drops an invocation's line."""
    lines = target.read_text().splitlines() if target.is_file() else []
    new = [line for line in source.read_text().splitlines() if line.strip() and line not in lines]
    if new or not target.is_file():
        merged = sorted(lines + new, key=lambda line: json.loads(line).get("time", ""))
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, "".join(line + "\n" for line in merged))


def _planned(out: Path, run: Path) -> list[dict]:
    """The invocations in ``out/provenance.jsonl`` that planned ``run`` (its arm's folder and its seed)."""
    path = out / PROVENANCE
    lines = path.read_text().splitlines() if path.is_file() else []
    seed = int(run.name.removeprefix("seed_"))
    return [{k: p[k] for k in PROVENANCE_KEYS if k in p} for p in map(json.loads, filter(str.strip, lines))
            if seed in map(int, p["seeds"].split(",")) and run.parent.name in set(map(slug, p["arms"]))]


def archive(out: Path, target: Path) -> int:
    """Copy the records of every finished run of the comparison ``out``, each trained detector's log and the
    provenance lines into ``target``; returns how many finished runs it holds. A run's ``provenance.json`` is
    written once, when it is first archived."""
    out, target = Path(out), Path(target)
    count = 0
    for metrics in sorted(out.glob("runs/*/seed_*/metrics.jsonl")):
        run = metrics.parent
        if not finished(run):
            continue
        archived = target / run.relative_to(out)
        if not (archived / RUN_PROVENANCE).is_file():
            archived.mkdir(parents=True, exist_ok=True)
            atomic_write(archived / RUN_PROVENANCE, json.dumps(_planned(out, run), indent=1) + "\n")
        _copy(run, archived, RECORDS)
        count += 1
    for detector in sorted(out.glob("detectors/*/detector.pt")):
        _copy(detector.parent, target / detector.parent.relative_to(out), DETECTOR_RECORDS)
    if (out / PROVENANCE).is_file():
        merge_lines(out / PROVENANCE, target / PROVENANCE)
    return count


def restore(out: Path, source: Path) -> None:
    """Put the archived runs that ``out`` lacks back (so they are reused, not trained again) and merge the
    provenance lines."""
    out, source = Path(out), Path(source)
    for config in source.glob("runs/*/seed_*/config.yaml"):
        run = out / config.parent.relative_to(source)
        if not (run / "metrics.jsonl").is_file():
            _copy(config.parent, run, RECORDS)
    if (source / PROVENANCE).is_file():
        merge_lines(source / PROVENANCE, out / PROVENANCE)


def archive_all(out: Path, target: Path) -> int:
    """:func:`archive` of every comparison folder of ``out`` into the same name under ``target`` (a benchmark of
    several comparisons); returns how many finished runs they hold."""
    return sum(archive(f, Path(target) / f.name) for f in sorted(Path(out).glob("*")) if f.is_dir())
