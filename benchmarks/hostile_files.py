"""Tiny hostile files against hafis's bounded readers: seconds and memory until each is refused.

Each case is read in a fresh process (``python -c``), so its peak resident memory is its own; the table also gives
the peak the reader itself allocated (``tracemalloc``) and the file's size. Cases: a YAML alias bomb as a config, a
checkpoint whose ``config`` is a 45-level shared dict, a zip-bomb checkpoint (200 MB of zeros deflated).

    python benchmarks/hostile_files.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import footer, header  # noqa: E402

PROBE = """
import json, resource, sys, time, tracemalloc
kind, path = sys.argv[1], sys.argv[2]
if kind == "yaml":
    from hafis.config import load_config as read
else:
    from hafis.engine.checkpoint import load_checkpoint as read
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
try:
    read(path)
    outcome = "accepted"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
seconds = time.perf_counter() - start
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"seconds": seconds, "traced_mb": traced / 1e6, "outcome": outcome,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e3}))
"""


def make_cases(folder: Path) -> list[tuple[str, str, Path]]:
    import torch

    bomb = folder / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)) + "name: *g\n")
    nested = folder / "nested.pt"
    shared: dict = {"x": 1}
    for _ in range(45):
        shared = {"a": shared, "b": shared}
    torch.save({"model": {"w": torch.zeros(1)}, "config": shared}, nested)
    zipped = folder / "zip_bomb.pt"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(200 << 20))
    return [("YAML alias bomb (9^7 strings)", "yaml", bomb), ("45-level shared dict checkpoint", "ckpt", nested),
            ("zip-bomb checkpoint (200 MB deflated)", "ckpt", zipped)]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    header("Hostile files: time and memory until refused")
    print("| file | size | seconds | traced peak (MB) | RSS growth (MB) | outcome |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, path in make_cases(Path(tmp)):
            out = subprocess.run([sys.executable, "-c", PROBE, kind, str(path)], capture_output=True, text=True,
                                 timeout=600, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            outcome = r["outcome"].replace(str(path), path.name)
            print(f"| {label} | {path.stat().st_size:,} B | {r['seconds']:.3f} | {r['traced_mb']:.1f} | "
                  f"{r['rss_growth_mb']:.1f} | {outcome[:90]} |", flush=True)
    footer()


if __name__ == "__main__":
    main()
