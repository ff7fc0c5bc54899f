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
    assert [c.folder for c in calls] == ["1_32", "1_32_x2", "1_32", "full", "1_8"]
    small, long, more, full = (dict(t.split("=") for t in c.common.split()) for c in calls[:4])
    # the convergence check: the same split, at least twice the passes (9,300 iterations: 20 x ceil(40 x 930 / 80))
    assert calls[1].arms == ["supervised"] and realistic.plan("convergence", 20) == [calls[1]]
    assert long["data.garments.num_labelled"] == small["data.garments.num_labelled"] == "62"
    assert int(long["train.iterations"]) == 9300 and 9300 * 4 / 930 >= 40
    assert more == small and calls[2].arms == ["augseg", "augseg+W"]
    assert full["train.iterations"] == small["train.iterations"] and full["data.garments.num_unlabelled"] == "0"
    assert realistic.plan("calibrate", 20) == [("1_32", ["supervised", "unimatch"], calls[0].common, "0")]
    # 5 seeds for the core arms and the convergence check, 3 for the others
    assert [c.seeds for c in calls] == ["0,1,2,3,4", "0,1,2,3,4", "0,1,2", "0,1,2", "0,1,2"]


def test_a_folder_trained_by_several_calls_is_reported_as_one():
    merged = realistic.merged(realistic.plan("all", 20))
    assert [c.folder for c in merged] == ["1_32", "1_32_x2", "full", "1_8"]
    assert merged[0].arms == list(realistic.ARMS) and merged[0].seeds == "0,1,2,3,4"
    a = realistic.Call("f", ["x"], "k=1", "0,1")
    b = realistic.Call("f", ["y", "x"], "k=1", "2,1")
    assert realistic.merged([a, b]) == [("f", ["x", "y"], "k=1", "0,1,2")]
    with pytest.raises(ValueError, match="folder f"):
        realistic.merged([a, b._replace(common="k=2")])


def test_every_planned_run_of_both_presets_is_a_valid_config():
    """What ``hafis compare`` would load for each call and arm (the GPU preset with its device set to the CPU, as
    ``--device cpu`` does to try it here)."""
    from dataclasses import replace

    from hafis.config import load_config

    gpu = replace(realistic.PRESETS["gpu"], overrides=realistic.PRESETS["gpu"].overrides + " train.device=cpu")
    for preset in (realistic.PRESETS["cpu"], gpu):
        for folder, arms, common, _ in realistic.plan("all", preset.passes, preset):
            for arm in arms:
                config = load_config(realistic.CONFIG,
                                     [*common.split(), *realistic.arm_overrides(arm, common).split()])
                assert config.train.unlabelled_batch_size == preset.unlabelled_batch
                assert config.data.garments.split_seed == realistic.SPLIT_SEED
                if config.weighting.enabled:  # the detector: DETECTOR_EPOCHS epochs over the split's labelled images
                    labelled = config.data.garments.num_labelled
                    assert config.detector.iterations == realistic.DETECTOR_EPOCHS * -(-labelled // 8)
                    assert (config.detector.arch, config.detector.batch_size) == ("efficientnet_lite0", 8)
                else:  # the arms without a detector keep the config's detector section (their configs do not move)
                    assert config.detector == load_config(realistic.CONFIG).detector
    config = load_config(realistic.CONFIG, realistic.plan("core", 40, gpu)[0].common.split())
    assert (config.data.garments.image_size, config.data.garments.classes) == (128, "fine")
    assert config.train.iterations * 16 / config.data.garments.num_unlabelled >= 40


def _write_run(out, arm, seed, evals, iterations=8):
    import json

    import yaml

    run = out / "1_32" / "runs" / realistic.slug(arm) / f"seed_{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"garments": {"num_train": 2000, "num_labelled": 62, "num_unlabelled": 930, "seed": 5,
                              "split_seed": None}},
        "train": {"iterations": iterations, "unlabelled_batch_size": 4}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "event": "eval", "miou": m}) + "\n" for i, m in evals))
    return run


def test_run_fields_provenance_and_the_paired_differences_along_the_schedule(tmp_path):
    import json

    out, archive = tmp_path / "out", tmp_path / "archive"
    _write_run(out, "unimatch+W(authors)", 0, [(2, 0.30), (4, 0.40), (6, 0.45), (8, 0.50)])
    _write_run(out, "unimatch", 0, [(2, 0.20), (4, 0.35), (6, 0.45), (8, 0.47)])
    _write_run(out, "unimatch", 1, [(2, 0.10), (4, 0.30)])  # unfinished: not archived
    lines = [{"time": "t0", "commit": "abc", "cpu": "X", "cores": 2, "avx512": True, "bf16": True, "torch": "2",
              "arms": ["unimatch"], "seeds": "0,1"},
             {"time": "t1", "commit": "def", "cpu": "Y", "cores": 2, "avx512": False, "bf16": False, "torch": "2",
              "arms": ["supervised", "unimatch+W(authors)"], "seeds": "0"}]
    (out / "1_32" / "provenance.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    assert realistic.archive(out, archive) == 2
    saved = json.loads((archive / "1_32" / "runs" / "unimatch" / "seed_0" / "provenance.json").read_text())
    assert [p["commit"] for p in saved] == ["abc"] and saved[0]["bf16"] is True and "arms" not in saved[0]
    assert not (archive / "1_32" / "runs" / "unimatch" / "seed_1").exists()

    row = {"arm": "unimatch+W(authors)", "seed": 0, "iterations": 8}
    fields = realistic.run_fields(out / "1_32", archive / "1_32", row)
    assert fields["unlabelled"] == 930 and fields["passes"] == 8 * 4 / 930
    assert fields["split_seed"] == 5  # null split_seed: the garments seed draws the split
    assert fields["miou_at"] == {"2": 0.30, "4": 0.40, "6": 0.45, "8": 0.50}
    assert [p["commit"] for p in fields["provenance"]] == ["def"]

    runs = [{**r, "labelled": 62, "iterations": 8, "best_miou": max(r["miou_at"].values()),
             "miou": r["miou_at"]["8"], "last_quarter_change": None}
            for r in ({"arm": "unimatch+W(authors)", "seed": 0, **fields},
                      {"arm": "unimatch", "seed": 0, "miou_at": {"2": 0.20, "4": 0.35, "6": 0.45, "8": 0.47}})]
    table = [line for line in realistic.headline(runs) if line.startswith("| unimatch+W(authors) − unimatch")]
    # at 1/4 (iteration 2): 30 - 20; at 1/2 (iteration 4): 40 - 35; final 50 - 47; best 50 - 47
    assert table == ["| unimatch+W(authors) − unimatch | 1 | +10.0 (n = 1) | +5.0 (n = 1) | +3.0 (n = 1) | "
                     "+3.0 (n = 1) |"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_provenance_is_dirty_for_code_changes_not_for_written_results(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "realistic.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    monkeypatch.setattr(realistic, "ROOT", tmp_path)
    head = realistic.provenance()["commit"]
    assert len(head) == 40 and not head.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "realistic.json").write_text('{"runs": []}\n')
    assert realistic.provenance()["commit"] == head  # the benchmark's own output
    (tmp_path / "code.py").write_text("a = 2\n")
    assert realistic.provenance()["commit"] == head + "+dirty"


def test_archiving_and_restoring_never_drop_an_invocations_provenance(tmp_path):
    """A checkout whose output folder holds an older provenance.jsonl than the archive (or the reverse) merges
    the two, in time order."""
    import json

    line = {t: json.dumps({"time": t, "commit": t}) for t in ("t1", "t2", "t3")}
    out, archive = tmp_path / "out" / "1_32", tmp_path / "archive" / "1_32"
    out.mkdir(parents=True)
    archive.mkdir(parents=True)
    (out / "provenance.jsonl").write_text(line["t1"] + "\n")  # stale
    (archive / "provenance.jsonl").write_text(line["t1"] + "\n" + line["t3"] + "\n")
    realistic.archive(out.parent, archive.parent)
    assert (archive / "provenance.jsonl").read_text().splitlines() == [line["t1"], line["t3"]]
    (out / "provenance.jsonl").write_text(line["t1"] + "\n" + line["t2"] + "\n")  # a new invocation here
    realistic.archive(out.parent, archive.parent)
    assert (archive / "provenance.jsonl").read_text().splitlines() == [line["t1"], line["t2"], line["t3"]]
    realistic.restore(out.parent, archive.parent)
    assert (out / "provenance.jsonl").read_text() == (archive / "provenance.jsonl").read_text()
