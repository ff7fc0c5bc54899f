"""Checkpoints written atomically and kept in a short rotation.

A checkpoint is first written to a temporary file in the same folder and then renamed over its final name, so a
crash mid-write never leaves a half-written file under a real name and never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a hafis checkpoint)."""


def save_atomic(state: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated zip archives
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a hafis checkpoint (no 'model' entry)")
    return state


class CheckpointManager:
    """``ckpt_<iteration>.pt`` files in ``directory``, the newest ``keep`` of them kept."""

    pattern = re.compile(r"ckpt_(\d+)\.pt$")

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def path_for(self, iteration: int) -> Path:
        return self.directory / f"ckpt_{iteration:08d}.pt"

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, iteration: int) -> Path:
        path = self.path_for(iteration)
        save_atomic(state, path)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: Any = "cpu") -> Optional[tuple[Path, dict]]:
        """The newest readable checkpoint; an unreadable newer one is reported and skipped, never deleted."""
        for path in reversed(self.list()):
            try:
                return path, load_checkpoint(path, map_location)
            except CheckpointError as exc:
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        return None
