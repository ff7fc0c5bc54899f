"""``train.amp: auto``: the training step's precision chosen by the hardware that runs it.

bf16 autocast pays only where the device computes bf16 natively: a CUDA GPU of compute capability 8.0 or later
(Ampere, Hopper, ...), or a CPU with AVX512-BF16 or AMX (``avx512_bf16`` / ``amx_bf16`` among the flags of
``/proc/cpuinfo``; oneDNN emulates bf16 elsewhere, 1.65x slower than float32 in ``benchmarks/iteration.py``). So
``auto`` is ``bf16`` there and ``off`` everywhere else, a CPU whose flags cannot be read (no ``/proc/cpuinfo``: macOS,
Windows) included. ``fp16`` is never chosen: it needs loss scaling and is the user's call.

The resolved precision is what a run trains in: the trainer logs it, records it in the run folder's
``provenance.jsonl`` and in each checkpoint, and a resume that would train in another precision is refused like any
other change of the experiment (``--allow-change train.amp`` accepts it).
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

#: the CPU flags (Linux ``/proc/cpuinfo``) of native bf16 arithmetic
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: the first CUDA compute capability with bf16 tensor cores (Ampere)
CUDA_BF16_CAPABILITY = (8, 0)
CPUINFO = "/proc/cpuinfo"


def cpu_flags() -> Optional[frozenset]:
    """The flags of the first CPU in ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm); ``None`` where the
    file cannot be read."""
    try:
        with open(CPUINFO) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def cpu_native_bf16() -> Optional[bool]:
    """Whether this CPU computes bf16 in hardware; ``None`` when its flags cannot be read."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & set(CPU_BF16_FLAGS))


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def _device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":  # train.device: auto
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_amp(amp: str, device: Union[str, torch.device]) -> tuple[str, str]:
    """``(precision, why)``: the precision ``train.amp`` means on ``device`` (``off``, ``bf16`` or ``fp16``) and a
    few words saying why, for the log. Only ``auto`` depends on the device."""
    if amp != "auto":
        return amp, f"train.amp={amp}"
    device = _device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "off", "train.amp=auto: no CUDA device is available"
        cc = cuda_capability(device)
        native = cc >= CUDA_BF16_CAPABILITY
        return ("bf16" if native else "off"), (f"train.amp=auto: CUDA compute capability {cc[0]}.{cc[1]} "
                                               f"{'>=' if native else '<'} 8.0")
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is None:
            return "off", "train.amp=auto: the CPU's flags cannot be read (no /proc/cpuinfo)"
        found = [f for f in CPU_BF16_FLAGS if f in flags]
        if found:
            return "bf16", f"train.amp=auto: CPU flag(s) {', '.join(found)}"
        return "off", f"train.amp=auto: the CPU has no {' or '.join(CPU_BF16_FLAGS)}"
    return "off", f"train.amp=auto: no native bf16 known for {device.type}"


__all__ = ["CPU_BF16_FLAGS", "CUDA_BF16_CAPABILITY", "cpu_flags", "cpu_native_bf16", "resolve_amp"]


def warn_if_emulated(precision: str, device: torch.device, stacklevel: int = 2) -> None:
    """A warning where bf16 is asked for on a CPU that only emulates it (slower than float32 there)."""
    if precision == "bf16" and device.type == "cpu" and cpu_native_bf16() is False:
        warnings.warn("train.amp=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates bf16, "
                      "which is slower than float32 (benchmarks/iteration.py: 1.65x the float32 step); "
                      "train.amp=off is faster here", stacklevel=stacklevel)
