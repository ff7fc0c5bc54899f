"""Helpers shared by the benchmarks: machine description, timing, peak memory, tables."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            found = re.search(r"model name\s*:\s*(.+)", fh.read())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "?"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def header(title: str) -> None:
    print(f"## {title}\n")
    print(f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
    print(f"- machine: {machine()}")
    print(f"- load average (1 / 5 / 15 min) at start: {load()}\n", flush=True)


def footer() -> None:
    print(f"\n- load average at end: {load()}", flush=True)


def sync(device: Optional[torch.device] = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1, device=None) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            found = re.search(rf"{field}:\s+(\d+) kB", fh.read())
        return int(found.group(1)) if found else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@contextmanager
def peak_rss(absolute: bool = False):
    """Peak resident memory above the resident memory at entry, in MiB: ``with peak_rss() as peak: ...; peak()``
    (``absolute``: the process's whole resident memory at the block's peak).

    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the process's high-water mark ``VmHWM`` to the
    current ``VmRSS``, so ``VmHWM`` after the block minus ``VmRSS`` before it is the block's own peak, tensors it
    allocates and frees included. So that memory glibc kept from earlier frees is not silently reused (which would
    under-count), inside the block every allocation of 64 KiB or more is its own ``mmap``, returned on free (the
    threshold is set back to glibc's 32 MiB ceiling afterwards). ``None`` where the reset is not possible.
    """
    result: dict = {}
    exact = not absolute and _mallopt(M_MMAP_THRESHOLD, 64 << 10)
    if exact:
        _mallopt(M_TRIM_THRESHOLD, 0)
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what earlier frees left, so RSS = live memory
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    try:
        yield lambda: result.get("mib")
    finally:
        after = _status_kib("VmHWM")
        if exact:
            _mallopt(M_MMAP_THRESHOLD, 32 << 20)
            _mallopt(M_TRIM_THRESHOLD, 64 << 20)
        if before is not None and after is not None:
            result["mib"] = after / 1024 if absolute else max(0.0, (after - before) / 1024)


def cuda_peak_mib(device) -> Optional[float]:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) < 10:
        return f"{value:.{digits + 1}f}"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    print("| " + " | ".join(cells[0]) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(row) + " |")
    print(flush=True)
