"""Every benchmark script starts: its imports still resolve after the library moves code, and it parses ``--help``."""

import json
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


def test_the_gpu_check_runs_dry_and_reports_every_part_it_ran(tmp_path):
    """``gpu_check.sh --dry`` on this CPU at tiny sizes, the parts that finish in seconds (predict's ONNX export
    and compile's compilation are left out here): one summary line a part, report.md and gpu_check.json in $OUT,
    the loaders beside the step rate of the steps part, the CPU run-to-run drift zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry",
                           "--parts=cuda_tests,drift,steps,v2,loaders"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran = ("env", "cuda_tests", "drift", "steps", "v2", "loaders")
    lines = [line for line in done.stdout.splitlines() if line.startswith("[gpu_check] ") and ": ok in " in line]
    assert [line.split()[1].rstrip(":") for line in lines] == list(ran), done.stdout
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in result["parts"].items()} == {
        **dict.fromkeys(ran, "ok"), "predict": "not run", "compile": "not run"}
    drift = {r["run"]: r for r in result["parts"]["drift"]["rows"]}
    assert drift["cpu (1) vs cpu (2)"]["weights identical"] is True and drift["cpu (1)"]["max loss diff vs CPU"] == 0
    assert [r["variant"] for r in result["parts"]["steps"]["rows"]] == ["fp32", "bf16", "bf16+cl"]
    assert all(r["feeds the step"] for r in result["parts"]["loaders"]["rows"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Loaders at crop 513 vs the step" in report and "*not run*" in report


def test_a_part_that_timed_out_keeps_its_finished_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    part = gpu_check.Part(tmp_path, "steps", dry=False, budget=75)
    part.row(variant="fp32", batch="8+8", **{"off ms": 512.0})
    (tmp_path / "status.json").write_text(json.dumps({"steps": {"rc": 124, "seconds": 75, "timeout": 75}}))
    assert gpu_check.summary_line(tmp_path, "steps", 124, 75) == "[gpu_check] steps: timed out in 75 s: 1 row(s) kept"
    gpu_check.report(tmp_path, tmp_path / "out", dry=False)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "*timed out, 75 s of 75 s*\n\n| variant | batch | off ms |\n|---|---|---|\n| fp32 | 8+8 | 512 |" in report
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]["drift"]["status"] == "not run"


def test_a_step_that_runs_out_of_memory_is_measured_at_the_largest_batch_that_fits(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check
    import step
    import torch

    tried = []

    def run_variant(preset, variant, args):
        batch = int(step.PRESETS[preset][1][-1].split("=")[1])
        tried.append(batch)
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [preset, variant, 100.0, 110.0, 10.0, 0, 0, 0, 3.0, 3.0, 10.0, 9.1, 900.0, 950.0, 1.5], []

    monkeypatch.setattr(step, "run_variant", run_variant)
    part = gpu_check.Part(tmp_path, "v2", dry=True, budget=None)
    s = gpu_check.sizes(dry=True)
    row = gpu_check._measure_step(part, "x", None, [], 21, 8, "bf16", s, 1, 0, encoder="e")
    assert tried == [8, 4, 2]
    assert {k: row[k] for k in ("encoder", "batch", "off ms", "W share %", "peak MiB on", "did not fit")} == {
        "encoder": "e", "batch": "2+2", "off ms": 100.0, "W share %": 100 * 10 / 110, "peak MiB on": 950.0,
        "did not fit": "8+8, 4+4"}
    tried.clear()
    assert gpu_check._measure_step(part, "x", None, [], 21, 8, "bf16", s, 1, 0, smallest=4) is None
    assert tried == [8, 4] and part.data["rows"][-1] == {"variant": "bf16", "batch": "-", "did not fit": "8+8, 4+4"}
