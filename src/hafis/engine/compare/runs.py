"""A run's folder as the comparison reads it: its metrics records, its status file and its config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from hafis.config import config_changes

from ..run_log import read_metrics
from .plan import RunSpec


def final_eval(records: Sequence[dict], iterations: int) -> Optional[dict]:
    """The evaluation at the end of the schedule, or None when the run has not got there."""
    done = [r for r in records if r.get("event") == "eval" and r.get("iteration") == iterations]
    return done[-1] if done else None


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        return read_metrics(path)
    except (OSError, json.JSONDecodeError):
        return []  # a line cut by a kill: the run resumes from its checkpoint and rewrites it


def config_conflict(spec: RunSpec) -> Optional[str]:
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


def read_status(spec: RunSpec) -> dict:
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
    #: unlabelled images per step (train.unlabelled_batch_size): with the run's unlabelled images, its passes
    unlabelled_batch: Optional[int] = None
    #: the precision of its steps (train.amp)
    precision: Optional[str] = None
    #: the invocations that trained it (its ``provenance.json`` in the records folder, :mod:`.records`)
    provenance: list = field(default_factory=list)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "eval"]

    @property
    def final(self) -> Optional[dict]:
        return final_eval(self.records, self.iterations)


def run_data(spec: RunSpec, problem: Optional[str] = None, records: Optional[Path] = None) -> RunData:
    """``records``: the comparison's records folder, where a finished run's ``provenance.json`` is."""
    w = spec.config.weighting
    status = read_status(spec)
    provenance = None if records is None else records / "runs" / spec.arm.slug / f"seed_{spec.seed}" / "provenance.json"
    return RunData(spec.arm.name, spec.seed, spec.config.train.framework,
                   {"enabled": w.enabled, "offset": w.offset, "normalize": w.normalize, "reliable": w.reliable,
                    "signal": w.signal, "shuffle": w.shuffle},
                   spec.config.train.iterations, read_records(spec.run_dir), status.get("wall_s"),
                   problem or status.get("problem"), spec.config.train.unlabelled_batch_size, spec.config.train.amp,
                   _read_json(provenance, []) if provenance else [])


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default
