"""hafis compare: the plan, the report against hand computations, and end to end on the tiny config."""

import json
import math
import statistics

import numpy as np
import pytest

from hafis.cli import main
from hafis.config import ConfigError, load_config
from hafis.engine.compare.plan import parse_arm, parse_seeds, plan_runs
from hafis.engine.compare.report import last_quarter_change, report_markdown, summarise
from hafis.engine.compare.runs import RunData
from hafis.engine.run_log import read_metrics, truncate_metrics

#: two-sided 95 % Student t quantiles (tables), df = 1 and 2
T95 = {1: 12.706204736, 2: 4.30265273}
OFF = {"enabled": False, "offset": 0.0, "normalize": "count", "reliable": "confidence"}


def test_parse_arm_and_seeds():
    arm = parse_arm("unimatch+W(authors): train.framework=unimatch weighting.offset=1 'name=a b'")
    assert arm.name == "unimatch+W(authors)" and arm.slug == "unimatch+W_authors_"
    assert arm.overrides == ["train.framework=unimatch", "weighting.offset=1", "name=a b"]
    assert parse_arm("plain:").overrides == []
    for bad in ("no colon here", ": a=1", "x: novalue"):
        with pytest.raises(ConfigError):
            parse_arm(bad)
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,a", "", "1,1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_plan_shares_one_detector_per_seed_and_validates_every_arm(tmp_path, tiny_config):
    arms = [parse_arm("w: weighting.enabled=true weighting.reliable=detector"),
            parse_arm("w1: weighting.enabled=true weighting.reliable=detector weighting.offset=1"),
            parse_arm("plain: weighting.enabled=false")]
    specs = plan_runs(tiny_config, arms, [0, 1], ["train.iterations=2"], tmp_path)
    assert [(s.arm.name, s.seed) for s in specs] == [("w", 0), ("w1", 0), ("plain", 0), ("w", 1), ("w1", 1),
                                                     ("plain", 1)]
    det = {(s.arm.name, s.seed): s.detector_dir for s in specs}
    assert det["w", 0] == det["w1", 0] != det["w", 1] == det["w1", 1]  # the detector depends on the seed only
    assert det["plain", 0] is None
    w0 = specs[0]
    assert w0.config.detector.output_dir == str(det["w", 0]) and w0.config.train.iterations == 2
    assert w0.config.seed == 0 and w0.run_dir == tmp_path / "runs" / "w" / "seed_0"
    changed = plan_runs(tiny_config, arms[:1], [0], ["detector.iterations=7"], tmp_path)[0]
    assert changed.detector_dir != det["w", 0]  # another detector recipe: another detector
    with pytest.raises(ConfigError, match="arm 'bad'.*weighting.ofset"):
        plan_runs(tiny_config, [arms[2], parse_arm("bad: weighting.ofset=1")], [0], [], tmp_path)
    assert not (tmp_path / "runs").exists()


def _run(arm, seed, miou, best, problem=None):
    records = [] if miou is None else [
        {"iteration": 5, "event": "eval", "miou": miou - 0.1, "best_miou": miou - 0.1, "labelled": 4},
        {"iteration": 10, "event": "eval", "miou": miou, "best_miou": best, "labelled": 4}]
    return RunData(arm, seed, "unimatch", OFF, 10, records, 12.0, problem)


def test_summary_and_report_equal_a_hand_computation():
    a = {0: (0.50, 0.55), 1: (0.52, 0.53), 2: (0.47, 0.50)}
    b = {0: (0.53, 0.56), 1: (0.51, 0.54)}
    runs = [_run("A", s, *v) for s, v in a.items()] + [_run("B", s, *v) for s, v in b.items()]
    runs += [_run("B", 2, None, None, problem="failed (exit 1); log: runs/B/seed_2/compare.log"),
             _run("C", 0, 0.40, 0.45)]
    summary = summarise(runs, ["A", "B", "C"], [0, 1, 2], "A")
    arms = {r["arm"]: r for r in summary["arms"]}
    assert arms["A"]["n"] == 3 and arms["B"]["n"] == 2 and arms["C"]["n"] == 1
    assert arms["A"]["miou"]["mean"] == pytest.approx(np.mean([0.50, 0.52, 0.47]))
    assert arms["A"]["miou"]["std"] == pytest.approx(np.std([0.50, 0.52, 0.47], ddof=1))
    assert arms["B"]["best_miou"]["mean"] == pytest.approx(0.55)
    assert arms["C"]["miou"]["std"] is None
    paired = {r["arm"]: r for r in summary["paired"]}
    d = np.array([0.53 - 0.50, 0.51 - 0.52])  # B - A on seeds 0, 1 (B's seed 2 failed)
    half = T95[1] * d.std(ddof=1) / math.sqrt(2)
    assert paired["B"]["n"] == 2 and paired["B"]["seeds"] == [0, 1]
    assert paired["B"]["miou"]["mean"] == pytest.approx(d.mean())
    assert paired["B"]["miou"]["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert paired["C"]["n"] == 1 and paired["C"]["miou"]["ci95"] is None
    missing = {(m["arm"], m["seed"]): m["why"] for m in summary["missing"]}
    assert missing == {("B", 2): "failed (exit 1); log: runs/B/seed_2/compare.log", ("C", 1): "not run",
                       ("C", 2): "not run"}

    text = report_markdown(summary, runs, {"config": "x.yaml", "command": "hafis compare", "machine": "m",
                                           "seeds": [0, 1, 2]}, ["A", "B", "C"])
    assert f"| A | unimatch | off | 3 | 49.67 ± {100 * np.std([0.50, 0.52, 0.47], ddof=1):.2f} |" in text
    assert f"| B | 2 | +1.00 | [{100 * (d.mean() - half):+.2f}, {100 * (d.mean() + half):+.2f}] |" in text
    assert "| C | 1 | -10.00 | n = 1: no interval |" in text
    assert "- B seed 2: failed (exit 1); log: runs/B/seed_2/compare.log" in text
    assert "No diagnostics were logged" in text


def _eval_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "eval"]


def test_compare_end_to_end_reuses_and_resumes(tmp_path, capsys, tiny_config, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config), "--arm", "plain: train.framework=unimatch",
            "--arm", "w: weighting.enabled=true", "--seeds", "0,1", "--jobs", "2", "--out", str(out),
            "--set", "train.eval_interval=1", "train.tensorboard=false", "eval.diagnostics_images=3",
            "train.amp=off"]  # the runs are subprocesses: the tiny config's auto pinned
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # --threads, not the cores shared out (4 each), sets the threads
    assert main([*args, "--threads", "1"]) == 0
    assert "4 of 4 runs to train, 2 at a time with 1 thread(s) each" in capsys.readouterr().out
    monkeypatch.undo()
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"command", "machine", "runs"} and results["command"].startswith("hafis compare ")
    assert len(results["runs"]) == 4
    keys = {"arm", "framework", "weighting", "seed", "labelled", "iterations", "miou", "best_miou", "wall_s",
            "unlabelled", "passes", "miou_at"}
    tiny = load_config(tiny_config)
    for row in results["runs"]:
        assert keys <= set(row)
        assert set(row["weighting"]) == {"enabled", "offset", "normalize", "reliable", "signal", "shuffle"}
        assert row["weighting"]["enabled"] == (row["arm"] == "w") and row["labelled"] == 8
        assert row["iterations"] == 3 and row["wall_s"] > 0 and isinstance(row["seed"], int)
        # the tiny config's unlabelled images, seen 3 iterations x its unlabelled batch times over
        assert row["unlabelled"] == tiny.data.synthetic.num_unlabelled
        assert row["passes"] == 3 * tiny.train.unlabelled_batch_size / row["unlabelled"]
        evals = _eval_records(out / "runs" / row["arm"] / f"seed_{row['seed']}")
        assert row["miou_at"] == {"1": evals[0]["miou"], "2": evals[1]["miou"], "3": evals[2]["miou"]}

    # the report against a hand computation from the runs' metrics.jsonl
    final = {(arm, s): _eval_records(out / "runs" / arm / f"seed_{s}")[-1] for arm in ("plain", "w") for s in (0, 1)}
    assert all(f["iteration"] == 3 for f in final.values())
    assert {(r["arm"], r["seed"]): r["miou"] for r in results["runs"]} == {k: f["miou"] for k, f in final.items()}
    report = (out / "report.md").read_text()
    for arm in ("plain", "w"):
        m = [final[arm, s]["miou"] for s in (0, 1)]
        b = [final[arm, s]["best_miou"] for s in (0, 1)]
        assert (f"| {100 * statistics.fmean(m):.2f} ± {100 * statistics.stdev(m):.2f} | "
                f"{100 * statistics.fmean(b):.2f} ± {100 * statistics.stdev(b):.2f} |") in report
    d = [final["w", s]["miou"] - final["plain", s]["miou"] for s in (0, 1)]
    half = T95[1] * statistics.stdev(d) / math.sqrt(2)
    mean = statistics.fmean(d)
    assert f"| w | 2 | {100 * mean:+.2f} | [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] |" in report
    assert (out / "miou.png").stat().st_size > 0 and (out / "diagnostics.png").stat().st_size > 0
    assert "| w | 3 | 2 |" in report  # the diagnostics table at the last evaluation, over both seeds
    diag = final["w", 0]["diagnostics"]
    assert {"pseudo_error_weighted", "auroc_weight", "auroc_confidence"} <= set(diag)
    assert "auroc_weight" not in final["plain", 0]["diagnostics"]  # weighting off: confidence diagnostics only

    # interrupt one run after iteration 2: drop its last checkpoint and its records past 2
    broken = out / "runs" / "w" / "seed_1"
    (broken / "checkpoints" / "ckpt_00000003.pt").unlink()
    truncate_metrics(broken / "metrics.jsonl", 2)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed_*/metrics.jsonl") if p.parent != broken}
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("finished before, reused") == 3 and "w seed 1: resuming" in log
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # no retraining of the finished runs
    assert _eval_records(broken)[-1] == final["w", 1]  # the resumed run ends where the uninterrupted one did
    again = json.loads((out / "results.json").read_text())["runs"]
    assert again[:3] == results["runs"][:3]  # seed-major order: plain 0, w 0, plain 1 reused as they were
    assert {**again[3], "wall_s": None} == {**results["runs"][3], "wall_s": None}
    assert again[3]["wall_s"] > results["runs"][3]["wall_s"]  # the resumed run's time adds up

    # --report-only rebuilds from the plan and the metrics
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_a_failing_run_is_named_with_its_log_and_the_others_go_on(tmp_path, capsys, tiny_config):
    out = tmp_path / "cmp"
    code = main(["compare", str(tiny_config), "--arm", "ok: train.framework=supervised", "--arm",
                 "broken: data.synthetic.num_unlabelled=0", "--seeds", "0", "--out", str(out),
                 "--set", "train.tensorboard=false", "train.iterations=1", "train.amp=off"])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == ["ok"]
    log = out / "runs" / "broken" / "seed_0" / "compare.log"
    assert "the unlabelled split is empty" in log.read_text()
    assert f"- broken seed 0: failed (exit 2); log: {log}" in (out / "report.md").read_text()


def test_a_bad_arm_key_exits_2_and_writes_nothing(tmp_path, capsys, tiny_config):
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_config), "--arm", "a: train.iteratons=3", "--out", str(out)]) == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert main(["compare", str(tiny_config), "--arm", "a:", "--baseline", "zz", "--out", str(out)]) == 2
    assert "--baseline 'zz'" in capsys.readouterr().err
    assert main(["compare", "--report-only", "--out", str(out)]) == 2
    assert not out.exists()


def test_a_run_folder_of_another_experiment_is_reported_a_moved_one_is_not(tmp_path, tiny_config):
    import yaml

    from hafis.config import to_dict
    from hafis.engine.compare.runs import config_conflict

    spec = plan_runs(tiny_config, [parse_arm("a: weighting.enabled=true")], [0], [], tmp_path)[0]
    spec.run_dir.mkdir(parents=True)
    saved = to_dict(spec.config)
    # written elsewhere and logged differently (a run folder copied from another machine): the same experiment
    saved["output_dir"], saved["name"] = "/elsewhere/runs/a", "copied"
    saved["detector"]["output_dir"], saved["train"]["log_interval"] = "/elsewhere/detector", 7
    (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_conflict(spec) is None
    saved["weighting"]["k"], saved["optim"]["lr"] = 3, 0.5
    (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    message = config_conflict(spec)
    assert "optim.lr" in message and "weighting.k" in message and "output_dir" not in message


def test_last_quarter_change_is_final_minus_the_evaluation_at_three_quarters():
    def run(seed, curve, iterations=8):
        records = [{"iteration": it, "event": "eval", "miou": m, "best_miou": max(curve.values()), "labelled": 4}
                   for it, m in curve.items()]
        return RunData("A", seed, "supervised", OFF, iterations, records, 1.0)

    # 3/4 of 8 iterations = 6: the evaluation at 6 is the reference, the one at 7 is inside the last quarter
    rising = run(0, {2: 0.30, 4: 0.40, 6: 0.45, 7: 0.47, 8: 0.50})
    flat = run(1, {4: 0.40, 6: 0.48, 8: 0.47})
    assert last_quarter_change(rising) == pytest.approx(0.05)
    assert last_quarter_change(flat) == pytest.approx(-0.01)
    assert last_quarter_change(run(2, {8: 0.5})) is None  # no evaluation before the last quarter
    assert last_quarter_change(run(3, {4: 0.4, 6: 0.45})) is None  # unfinished
    summary = summarise([rising, flat, run(2, {8: 0.5})], ["A"], [0, 1, 2], "A")
    quarter = summary["arms"][0]["last_quarter_change"]
    assert quarter["mean"] == pytest.approx(0.02) and quarter["std"] == pytest.approx(np.std([0.05, -0.01], ddof=1))
    text = report_markdown(summary, [rising, flat], {"config": "x.yaml", "command": "c", "machine": "m",
                                                      "seeds": [0, 1, 2]}, ["A"])
    assert f"| +2.00 ± {100 * np.std([0.05, -0.01], ddof=1):.2f} |" in text


def test_an_interrupted_runner_keeps_the_time_its_run_trained(tmp_path, capsys, tiny_config, monkeypatch):
    """The time of an invocation that is killed before its run ends is recorded as the run goes, so that a resumed
    run's ``wall_s`` counts every invocation (the runner itself can be killed, not only the run)."""
    import hafis.engine.compare.pool as pool

    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config), "--arm", "plain: train.framework=supervised", "--seeds", "0", "--jobs", "1",
            "--threads", "1", "--out", str(out), "--set", "train.tensorboard=false", "train.iterations=4",
            "train.amp=off"]
    status = out / "runs" / "plain" / "seed_0" / "compare_run.json"
    real_write, ticks = pool.write_json, []

    def write_then_interrupt(path, data, **kw):
        real_write(path, data, **kw)
        if path == status and data["returncode"] is None:
            ticks.append(data["wall_s"])
            raise KeyboardInterrupt  # as if the runner were stopped here, after one update

    monkeypatch.setattr(pool, "STATUS_INTERVAL", 0.01)
    monkeypatch.setattr(pool, "write_json", write_then_interrupt)
    assert main(args) != 0
    assert len(ticks) == 1 and ticks[0] > 0
    assert json.loads(status.read_text()) == {"wall_s": ticks[0], "returncode": None, "problem": None,
                                              "log": str(status.parent / "compare.log")}
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["wall_s"] > ticks[0]  # the interrupted invocation's time is in the total


def test_the_report_names_the_weightings_controls():
    control = {"enabled": True, "offset": 1.0, "normalize": "weight", "reliable": "detector", "signal": "confidence",
               "shuffle": True}
    runs = [RunData("c", 0, "unimatch", control, 10, [{"iteration": 10, "event": "eval", "miou": 0.5,
                                                       "best_miou": 0.5}], 1.0)]
    text = report_markdown(summarise(runs, ["c"], [0], "c"), runs, {"config": "x.yaml", "command": "hafis compare",
                                                                    "machine": "m", "seeds": [0]}, ["c"])
    assert "| c | unimatch | offset 1, weight, detector, W from confidence, shuffled | 1 |" in text
