"""A run folder belongs to one run: ``hafis train`` never silently writes into another run's folder.

A folder that holds a run (a checkpoint, or records in ``metrics.jsonl``) is refused unless the new command
continues it (``--resume``) or discards it (``--overwrite``, which removes only the files a run writes). While a
trainer runs, it holds an exclusive lock on ``<run folder>/.lock`` (``flock``, released by the kernel when the
process ends, so the lock of a killed process is never stale); a second trainer on the same folder stops with the
first one's process id. Once the lock is held, temporary checkpoint files a killed write left behind are removed.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from hafis.errors import UserError
from hafis.files import WriteError, append_line, is_temporary, json_dumps

from .checkpoint import CheckpointManager

LOCK_NAME = ".lock"
#: files and folders a run writes into its folder (what ``--overwrite`` removes)
RUN_FILES = ("metrics.jsonl", "config.yaml", "provenance.jsonl")
RUN_FOLDERS = ("checkpoints", "tensorboard")


class RunFolderError(UserError):
    """The run folder holds another run, or another process is training into it."""


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_provenance(run_dir: Path, iteration: int, device, processes: int, amp: str, precision: str,
                      reason: str) -> None:
    """One line per invocation in the run folder's ``provenance.jsonl`` (the machine and the precision it trains in,
    from which iteration), and the precision on stdout when ``train.amp: auto`` chose it."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "iteration": iteration,
              "device": str(device), "device_name": _device_name(device), "processes": processes,
              "torch": torch.__version__, "amp": amp, "precision": precision, "precision_reason": reason}
    append_line(run_dir / "provenance.jsonl", json_dumps(record))
    if amp == "auto":
        print(f"precision: {precision} ({reason})", flush=True)


def describe_run(run_dir: Path) -> Optional[str]:
    """What run the folder holds (``None`` when it holds none): its newest checkpoint's iteration, or that it has
    records but no checkpoint."""
    checkpoints = CheckpointManager(run_dir / "checkpoints").list()
    if checkpoints:
        iteration = int(CheckpointManager.pattern.match(checkpoints[-1].name).group(1))
        return f"a run with checkpoints up to iteration {iteration}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a partial run (records in metrics.jsonl, no checkpoint)"
    return None


def check_free(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a new run in a folder that holds a run, unless it is continued or discarded."""
    if resume or overwrite:
        return
    found = describe_run(run_dir)
    if found:
        raise RunFolderError(f"run folder {run_dir} already holds {found}; continue it with --resume, choose "
                             f"another name or output_dir, or discard it with --overwrite")


class RunFolderLock:
    """The exclusive lock on a run folder; :meth:`release` (or the end of the process) frees it."""

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(run_dir: Path, resume: bool = False, overwrite: bool = False) -> RunFolderLock:
    """Create the folder, take its lock, check it again under the lock (:func:`check_free`), discard the old run
    with ``overwrite``, and remove stale temporary files of killed checkpoint writes."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create run folder {run_dir}: {exc.strerror or exc}") from None
    lock = _lock(run_dir / LOCK_NAME)
    try:
        check_free(run_dir, resume, overwrite)
        if overwrite and not resume:
            discard(run_dir)
        remove_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _lock(path: Path) -> RunFolderLock:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder is checked, not locked
        return RunFolderLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"run folder {path.parent} is in use by another hafis process (pid {holder}, lock "
                             f"{path}); wait for it to end, or choose another name or output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunFolderLock(path, fd)


def discard(run_dir: Path) -> None:
    """Remove what a run wrote (:data:`RUN_FILES`, :data:`RUN_FOLDERS`); any other file of the folder stays."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in the run folder and its checkpoint folder (only
    safe under the lock: no other writer is running). Returns what was removed."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and is_temporary(path):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


__all__ = ["LOCK_NAME", "RunFolderError", "RunFolderLock", "check_free", "claim", "describe_run", "discard",
           "remove_temporaries"]
