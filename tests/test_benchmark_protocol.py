"""The realistic benchmark's protocol: its records are committed, its schedule is counted in unlabelled passes."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import realistic  # noqa: E402

from hafis.engine.compare import records  # noqa: E402
from hafis.engine.compare.join import split_names, split_tables  # noqa: E402
from hafis.engine.compare.plan import slug  # noqa: E402
from hafis.engine.compare.plots import plot_curves  # noqa: E402


def headline(runs):
    """The report's tables per split and precision, as ``benchmarks/realistic.py`` asks compare for them."""
    return split_tables(runs, [*realistic.ARMS, realistic.LONG, "fully-supervised"], realistic.CONTRASTS,
                        realistic.POOL)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_archived_records_are_not_ignored_and_checkpoints_are():
    archive = realistic.ARCHIVE.relative_to(ROOT)
    run = archive / "1_32" / "runs" / "unimatch" / "seed_0"
    kept = [run / name for name in records.RECORDS] + [
        archive / "1_32" / "detectors" / "abc" / name for name in records.DETECTOR_RECORDS] + [
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
    assert merged[0].arms == [*realistic.CORE, *realistic.MORE] and merged[0].seeds == "0,1,2,3,4"
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
    from hafis.engine.compare.plan import needs_detector

    gpu = replace(realistic.PRESETS["gpu"], overrides=realistic.PRESETS["gpu"].overrides + " train.device=cpu")
    base_detector = load_config(realistic.CONFIG).detector
    for preset in (realistic.PRESETS["cpu"], gpu):
        calls = realistic.plan("all", preset.passes, preset)
        if preset is realistic.PRESETS["cpu"]:  # the evidence stage's arms and a float32 folder, once
            calls += realistic.plan("evidence", preset.passes, preset) + realistic.in_fp32(calls[:1])
        planned = {(c.folder, c.common, arm): None for c in calls for arm in c.arms}
        for folder, common, arm in planned:  # each distinct run config once
            config = load_config(realistic.CONFIG,
                                 [*common.split(), *realistic.arm_overrides(arm, common).split()])
            assert config.train.unlabelled_batch_size == preset.unlabelled_batch
            assert config.data.garments.split_seed == realistic.SPLIT_SEED
            assert config.train.amp == ("off" if folder.endswith(realistic.FP32) else "bf16")
            if needs_detector(config):  # the detector: DETECTOR_EPOCHS epochs over the split's labelled images
                labelled = config.data.garments.num_labelled
                assert config.detector.iterations == realistic.DETECTOR_EPOCHS * -(-labelled // 8)
                assert (config.detector.arch, config.detector.batch_size) == ("efficientnet_lite0", 8)
            else:  # the arms without a detector keep the config's detector section (their configs do not move)
                assert config.detector == base_detector
    config = load_config(realistic.CONFIG, realistic.plan("core", 40, gpu)[0].common.split())
    assert (config.data.garments.image_size, config.data.garments.classes) == (128, "fine")
    assert config.train.iterations * 16 / config.data.garments.num_unlabelled >= 40


def _write_run(out, arm, seed, evals, iterations=8):
    import json

    import yaml

    run = out / "1_32" / "runs" / slug(arm) / f"seed_{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"garments": {"num_train": 2000, "num_labelled": 62, "num_unlabelled": 930, "seed": 5,
                              "split_seed": None}},
        "train": {"iterations": iterations, "unlabelled_batch_size": 4}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "event": "eval", "miou": m, "best_miou": m}) + "\n" for i, m in evals))
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
    assert records.archive_all(out, archive) == 2
    saved = json.loads((archive / "1_32" / "runs" / "unimatch" / "seed_0" / "provenance.json").read_text())
    assert [p["commit"] for p in saved] == ["abc"] and saved[0]["bf16"] is True and "arms" not in saved[0]
    assert not (archive / "1_32" / "runs" / "unimatch" / "seed_1").exists()

    # compare's row of the run (its records and, from the archive, its provenance) and the protocol's fields
    from hafis.engine.compare.plan import Arm, plan_runs
    from hafis.engine.compare.report import result_rows
    from hafis.engine.compare.runs import run_data

    spec = plan_runs(realistic.CONFIG, [Arm("unimatch+W(authors)", [])], [0],
                     ["train.iterations=8", "train.eval_interval=2"], out / "1_32")[0]
    row = result_rows([run_data(spec, records=archive / "1_32")])[0]
    fields = {**row, **realistic.run_fields(out / "1_32", row)}
    assert fields["unlabelled"] == 930 and fields["passes"] == 8 * 4 / 930
    assert fields["split_seed"] == 5  # null split_seed: the garments seed draws the split
    assert fields["miou_at"] == {"2": 0.30, "4": 0.40, "6": 0.45, "8": 0.50}
    assert [p["commit"] for p in fields["provenance"]] == ["def"]

    runs = [{**r, "labelled": 62, "iterations": 8, "best_miou": max(r["miou_at"].values()),
             "miou": r["miou_at"]["8"], "last_quarter_change": None}
            for r in ({"arm": "unimatch+W(authors)", "seed": 0, **fields},
                      {"arm": "unimatch", "seed": 0, "precision": fields["precision"],
                       "miou_at": {"2": 0.20, "4": 0.35, "6": 0.45, "8": 0.47}})]
    table = [line for line in headline(runs) if line.startswith("| unimatch+W(authors) − unimatch")]
    # at 1/4 (iteration 2): 30 - 20; at 1/2 (iteration 4): 40 - 35; final 50 - 47; best 50 - 47
    assert table == ["| unimatch+W(authors) − unimatch | 1 | +10.0 (n = 1) | +5.0 (n = 1) | +3.0 (n = 1) | "
                     "+3.0 (n = 1) |"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_provenance_is_dirty_for_code_changes_not_for_written_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "realistic.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    code = [tmp_path / "code.py"]  # what trains (hafis compare: records.code_paths, the package and the configs)
    head = records.provenance(tmp_path, code)["commit"]
    assert len(head) == 40 and not head.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "realistic.json").write_text('{"runs": []}\n')
    assert records.provenance(tmp_path, code)["commit"] == head  # the benchmark's own output
    (tmp_path / "code.py").write_text("a = 2\n")
    assert records.provenance(tmp_path, code)["commit"] == head + "+dirty"


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
    records.archive_all(out.parent, archive.parent)
    assert (archive / "provenance.jsonl").read_text().splitlines() == [line["t1"], line["t3"]]
    (out / "provenance.jsonl").write_text(line["t1"] + "\n" + line["t2"] + "\n")  # a new invocation here
    records.archive_all(out.parent, archive.parent)
    assert (archive / "provenance.jsonl").read_text().splitlines() == [line["t1"], line["t2"], line["t3"]]
    records.restore(out, archive)
    assert (out / "provenance.jsonl").read_text() == (archive / "provenance.jsonl").read_text()


def _weighting_of(arm, common):
    from hafis.config import load_config

    config = load_config(realistic.CONFIG, [*common.split(), *realistic.arm_overrides(arm, common).split()])
    w = config.weighting
    return config, (config.train.framework, w.enabled, w.offset, w.normalize, w.reliable, w.signal, w.shuffle)


def test_the_evidence_stage_trains_the_unimatch_arms_then_each_framework_in_both_forms():
    calls = realistic.plan("evidence", 20)
    assert [c.arms for c in calls] == [
        ["supervised", "unimatch", "unimatch+W", "unimatch+W(authors)", "unimatch+W(authors,shuffled)",
         "unimatch+confidence-weight(authors)", "unimatch+W(authors,confidence-bank)",
         "unimatch+W(paper,weight-normalised)"],
        ["augseg", "augseg+W", "augseg+W(authors)"], ["u2pl", "u2pl+W", "u2pl+W(authors)"],
        ["ael", "ael+W", "ael+W(authors)"]]
    # today's 1/32 split, schedule and settings for every arm; 5 seeds for the UniMatch arms, 3 for the others
    core = realistic.plan("core", 20)[0]
    assert all(c.folder == "1_32" and c.common == core.common for c in calls)
    assert [c.seeds for c in calls] == ["0,1,2,3,4", "0,1,2", "0,1,2", "0,1,2"]
    assert realistic.merged(calls)[0].arms == [a for c in calls for a in c.arms]
    # (framework, enabled, offset, normalize, reliable, signal, shuffle)
    expected = {
        "supervised": ("supervised", False, 0.0, "count", "detector", "similarity", False),
        "unimatch+W": ("unimatch", True, 0.0, "count", "detector", "similarity", False),
        "unimatch+W(authors)": ("unimatch", True, 1.0, "weight", "detector", "similarity", False),
        "unimatch+W(authors,shuffled)": ("unimatch", True, 1.0, "weight", "detector", "similarity", True),
        "unimatch+confidence-weight(authors)": ("unimatch", True, 1.0, "weight", "detector", "confidence", False),
        "unimatch+W(authors,confidence-bank)": ("unimatch", True, 1.0, "weight", "confidence", "similarity", False),
        "unimatch+W(paper,weight-normalised)": ("unimatch", True, 0.0, "weight", "detector", "similarity", False),
    }
    for fw in ("augseg", "u2pl", "ael"):
        expected[fw] = (fw, False, 0.0, "count", "detector", "similarity", False)
        expected[f"{fw}+W"] = (fw, True, 0.0, "count", "detector", "similarity", False)
        expected[f"{fw}+W(authors)"] = (fw, True, 1.0, "weight", "detector", "similarity", False)
    for arm, want in expected.items():
        assert _weighting_of(arm, core.common)[1] == want, arm
    # each control is one key away from unimatch+W(authors) (the confidence bank needs no detector recipe either)
    from hafis.config import config_changes, to_dict

    authors = to_dict(_weighting_of("unimatch+W(authors)", core.common)[0])
    moved = {arm: sorted(k for k in config_changes(authors, _weighting_of(arm, core.common)[0])
                         if not k.startswith("detector."))
             for arm in realistic.CONTROLS}
    assert moved == {"unimatch+W(authors,shuffled)": ["weighting.shuffle"],
                     "unimatch+confidence-weight(authors)": ["weighting.signal"],
                     "unimatch+W(authors,confidence-bank)": ["weighting.reliable"],
                     "unimatch+W(paper,weight-normalised)": ["weighting.offset"]}
    # every control is paired with the form it changes, and the frameworks' forms with the bare framework
    for arm in realistic.CONTROLS:
        assert (arm, "unimatch+W(authors)") in realistic.CONTRASTS
    for fw in ("augseg", "u2pl", "ael"):
        assert {(fw, "supervised"), (f"{fw}+W", fw), (f"{fw}+W(authors)", fw)} <= set(realistic.CONTRASTS)


def test_the_stage_runs_its_calls_in_order_with_the_seed_flags(tmp_path, monkeypatch):
    """``main`` with ``hafis compare`` stubbed: the calls of ``--stage evidence``, their seeds, precision and threads
    (each invocation's provenance line with them is compare's: tests/engine/test_compare_records.py)."""
    calls = []
    monkeypatch.setattr(realistic, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(realistic, "compare", lambda folder, arms, common, seeds, jobs, out, report_only, threads,
                        archive_to=None: calls.append((folder, arms, seeds, report_only, "train.amp=off" in common,
                                                       archive_to, threads)) or 0)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["realistic.py", "--stage", "evidence", "--more-seeds", "0,1,2,3,4", "--fp32",
                                      "--out", str(out)])
    assert realistic.main() == 0
    trained = [c for c in calls if not c[3]]
    assert [c[1][0] for c in trained] == ["supervised", "augseg", "u2pl", "ael"]
    assert {c[0] for c in calls} == {"1_32_fp32"} and all(c[4] for c in calls)
    assert [c[2] for c in trained] == ["0,1,2,3,4"] * 4
    assert all(c[5] == tmp_path / "results" / "realistic_runs" for c in trained)  # archived while they train
    assert all(c[6] == 1 for c in trained)
    report = (tmp_path / "results" / "realistic.md").read_text()
    assert "--stage evidence --more-seeds 0,1,2,3,4 --fp32" in report
    assert "## What the controls say about the mechanism" in report and "realistic_mechanism.md" in report


def test_runs_of_two_precisions_never_pair_and_the_per_arm_tables():
    def row(arm, seed, miou, precision="bf16", **kw):
        return {"arm": arm, "seed": seed, "labelled": 62, "iterations": 8, "precision": precision, "miou": miou,
                "best_miou": miou, "last_quarter_change": None, "miou_at": {"8": miou}, **kw}

    iou = {"background": 0.9, "top": 0.5}
    diag = {"auroc_weight": 0.4, "auroc_confidence": 0.9, "bank_detector_precision": 0.8, "weight_class_0": 1.2,
            "weight_class_1": 1.6}
    runs = [row("unimatch", 0, 0.50, iou_by_class=iou), row("unimatch", 1, 0.54, iou_by_class={"background": 0.8,
                                                                                                "top": 0.7}),
            row("unimatch+W(authors)", 0, 0.53, diagnostics=diag),
            row("unimatch+W(authors)", 1, 0.60, diagnostics={**diag, "auroc_weight": 0.5, "weight_class_1": None}),
            row("unimatch", 0, 0.40, "off"), row("unimatch+W(authors)", 0, 0.45, "off")]
    lines = headline(runs)
    pairs = [line for line in lines if line.startswith("| unimatch+W(authors) − unimatch |")]
    # bf16: seeds 0 and 1 (+3, +6); float32: seed 0 alone (+5), never paired with the bf16 runs
    assert len(pairs) == 2 and pairs[0].startswith("| unimatch+W(authors) − unimatch | 2 | ")
    assert "| +4.5 (" in pairs[0]
    assert pairs[1] == "| unimatch+W(authors) − unimatch | 1 | – | – | +5.0 (n = 1) | +5.0 (n = 1) |"
    assert any("(float32 steps)" in line for line in lines)
    # IoU per class: mean ± std over the two seeds (90, 80 -> 85.0 ± 7.1; 50, 70 -> 60.0 ± 14.1)
    assert "| unimatch | 2 | 85.0 ± 7.1 | 60.0 ± 14.1 |" in lines
    # final diagnostics, mean over seeds: AUROC W (0.4 + 0.5) / 2; bank precision 80 %; mean W per class, a missing
    # value left out of its mean
    table = [line for line in lines if line.startswith("| unimatch+W(authors) | 2 |")]
    assert table[1:] == ["| unimatch+W(authors) | 2 | 0.450 | – | 0.900 | – | 80.0 | – | 1.20 | 1.60 |"]


def test_each_control_arm_trains_a_few_tiny_steps(tmp_path, tiny_config):
    """The controls' weighting keys on the tiny config (confidence bank: no detector there), two steps each, with
    every pixel counted and the bank filled from the first step, so that W is not the same everywhere."""
    from hafis.config import load_config
    from hafis.engine.run_log import read_metrics
    from hafis.engine.trainer import Trainer

    for arm in realistic.CONTROLS:
        keys = [o for o in realistic.ARMS[arm].split() if o.startswith("weighting.")]
        config = load_config(tiny_config, [*keys, "weighting.reliable=confidence", "weighting.labelled_threshold=0",
                                           "weighting.tau_seg=0", "unimatch.threshold=0", "train.iterations=2",
                                           "train.tensorboard=false", f"output_dir={tmp_path / slug(arm)}"])
        trainer = Trainer(config)
        trainer.train()
        logged = read_metrics(tmp_path / slug(arm) / "metrics.jsonl")
        steps = [r for r in logged if "loss" in r]
        assert [r["iteration"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps), arm
        assert logged[-1]["event"] == "eval" and logged[-1]["iteration"] == 2, arm
        weighting = trainer.framework.weighting
        if config.weighting.shuffle:  # the three pseudo-label terms of each step, each shuffled
            assert weighting.shuffle_draws == 6
        if config.weighting.signal == "confidence":  # W = 1 + q with q in [1/C, 1]: above 1 + 1/4 on 4 classes
            assert all(1.25 <= r["weight_mean"] <= 2.0 for r in steps)
        else:
            assert weighting.weighter.bank.labelled.count.sum() > 0, arm


def test_arm_lists_keep_the_commas_inside_an_arms_parentheses_and_the_figure(tmp_path):
    assert split_names("unimatch,unimatch+W(authors,shuffled), ael+W(authors)") == [
        "unimatch", "unimatch+W(authors,shuffled)", "ael+W(authors)"]
    assert set(split_names(",".join(realistic.ARMS))) == set(realistic.ARMS)
    rows = [{"arm": "unimatch", "seed": s, "miou_at": {"2": 0.3 + s / 10, "4": 0.4}} for s in (0, 1)]
    assert not plot_curves(rows, ["supervised"], tmp_path / "none.png", "t")
    assert not (tmp_path / "none.png").exists()
    assert plot_curves(rows, ["supervised", "unimatch"], tmp_path / "f.png", "t")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_compare_call_names_repository_paths_and_archives_while_it_trains(monkeypatch):
    """The call's paths are relative to the repository; its records folder is the archive's folder of the call, which
    ``hafis compare`` fills as each run finishes (tests/engine/test_compare_records.py)."""
    import hafis.engine.compare.join as join

    seen = {}

    class FakeRun:
        def __init__(self, command, cwd):
            seen.update(command=command, cwd=cwd)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(join.subprocess, "Popen", FakeRun)
    out = realistic.ROOT / "bench_out" / "x"
    assert realistic.compare("1_32", ["unimatch"], "train.iterations=8", "0", 2, out, False, 1, Path("/a")) == 0
    command = seen["command"]
    assert seen["cwd"] == realistic.ROOT and command[command.index("--records") + 1] == "/a/1_32"
    assert command[command.index("--threads") + 1] == "1"
    assert command[command.index("compare") + 1] == "configs/realistic/base.yaml"
    assert command[command.index("--out") + 1] == "bench_out/x/1_32"
    assert command[command.index("--arm") + 1] == "unimatch: train.framework=unimatch"
