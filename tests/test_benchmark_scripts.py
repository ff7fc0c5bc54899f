"""Every benchmark script starts: its imports still resolve after the library moves code, and it parses ``--help``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_the_list_of_scripts_is_not_empty():
    assert {"realistic.py", "step.py", "detector_tuning.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_help(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_step_benchmark_runs_a_tiny_step():
    """The step benchmark builds its own batches (the second batch of UniMatch's mix included): one tiny step runs
    and reports the weighting's parts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "step.py"), "--preset", "tiny", "--steps", "1",
                           "--warmup", "0", "--threads", "1", "--no-compare-mask"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| tiny | fp32 | sum of the parts |" in done.stdout
