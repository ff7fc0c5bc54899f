"""What a run writes besides checkpoints: ``metrics.jsonl`` (one strict-JSON object a line) and TensorBoard
scalars.

Each record is appended whole or not at all (:func:`hafis.files.append_line`); a line cut by a kill is dropped when
the run resumes (:func:`truncate_metrics`), and readers skip it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional

from hafis.files import append_line, atomic_write, json_dumps


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the run goes on: metrics.jsonl holds every record
                warnings.warn("train.tensorboard is on but TensorBoard is not installed (pip install 'hafis[viz]'); "
                              "the metrics go to metrics.jsonl only", stacklevel=2)
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any], prefix: Optional[str] = None) -> None:
        if not self.enabled:
            return
        append_line(self.path, json_dumps(record))
        if self._tb is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``. A last line that is not a whole record (what a kill mid-write leaves) is
    skipped; another unreadable line is skipped with a warning."""
    records = []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # UnicodeDecodeError and JSONDecodeError included
            if number != last:
                warnings.warn(f"{path} line {number + 1} is not a JSON record; skipped", stacklevel=2)
            continue
        records.append(record)
    return records


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the records up to ``iteration`` (a resumed run replays the later steps and logs them again); a torn or
    unreadable line goes too."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if _iteration(r) <= iteration]
    atomic_write(path, "".join(json_dumps(r) + "\n" for r in kept))


def _iteration(record: dict) -> float:
    value = record.get("iteration", 0)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.inf
