"""The realistic benchmark's protocol: its records are committed, its schedule is counted in unlabelled passes."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import realistic  # noqa: E402


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_archived_records_are_not_ignored_and_checkpoints_are():
    archive = realistic.ARCHIVE.relative_to(ROOT)
    run = archive / "1_32" / "runs" / "unimatch" / "seed_0"
    kept = [run / name for name in realistic.RECORDS] + [
        archive / "1_32" / "detectors" / "abc" / name for name in realistic.DETECTOR_RECORDS] + [
        archive / "1_32" / "provenance.jsonl"]
    ignored = [run / "checkpoints" / "ckpt_00000010.pt", Path("runs") / "x" / "metrics.jsonl",
               Path("bench_out") / "realistic" / "1_32" / "runs" / "unimatch" / "seed_0" / "metrics.jsonl"]
    for path in kept + ignored:
        code = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(path)], cwd=ROOT).returncode
        assert code == (0 if path in ignored else 1), path


def test_the_schedule_is_counted_in_unlabelled_passes():
    s = realistic.schedule(62, 20)
    assert s["unlabelled"] == 15 * 62 == 930
    assert s["iterations"] % realistic.EVALS == 0 and s["eval_interval"] * realistic.EVALS == s["iterations"]
    # iterations x unlabelled batch / unlabelled images, and at least the passes asked for
    assert s["passes"] == s["iterations"] * 4 / 930 >= 20
    assert s["iterations"] == 4660  # 20 evaluation intervals of ceil(20 x 930 / 4 / 20) = 233 iterations
    big = realistic.schedule(250, 20)
    assert big["unlabelled"] == 2000 - 250  # 15 x 250 is more than the pool holds
    overrides = realistic.split_overrides(62, s).split()
    assert "data.garments.num_unlabelled=930" in overrides and "train.iterations=4660" in overrides
    assert f"data.garments.split_seed={realistic.SPLIT_SEED}" in overrides


def test_every_arm_of_a_split_gets_the_same_schedule():
    calls = realistic.plan("all", 20)
    folders = [c[0] for c in calls]
    assert folders == ["1_32", "full", "1_8"]
    small = dict(t.split("=") for t in calls[0][2].split())
    full = dict(t.split("=") for t in calls[1][2].split())
    assert full["train.iterations"] == small["train.iterations"] and full["data.garments.num_unlabelled"] == "0"
    assert realistic.plan("calibrate", 20) == [("1_32", ["supervised", "unimatch"], calls[0][2])]


def test_every_planned_run_of_both_presets_is_a_valid_config():
    """What ``hafis compare`` would load for each call and arm (the GPU preset with its device set to the CPU, as
    ``--device cpu`` does to try it here)."""
    from dataclasses import replace

    from hafis.config import load_config

    gpu = replace(realistic.PRESETS["gpu"], overrides=realistic.PRESETS["gpu"].overrides + " train.device=cpu")
    for preset in (realistic.PRESETS["cpu"], gpu):
        for folder, arms, common in realistic.plan("all", preset.passes, preset):
            for arm in arms:
                config = load_config(realistic.CONFIG, [*common.split(), *realistic.arm_overrides(arm).split()])
                assert config.train.unlabelled_batch_size == preset.unlabelled_batch
                assert config.data.garments.split_seed == realistic.SPLIT_SEED
    config = load_config(realistic.CONFIG, realistic.plan("core", 40, gpu)[0][2].split())
    assert (config.data.garments.image_size, config.data.garments.classes) == (128, "fine")
    assert config.train.iterations * 16 / config.data.garments.num_unlabelled >= 40
