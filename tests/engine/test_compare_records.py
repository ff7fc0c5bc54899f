"""hafis compare's records folder (``--records``): what it keeps of finished runs and their provenance, and what it
puts back."""

import json
from pathlib import Path

import yaml

from hafis.config import to_dict
from hafis.engine.compare import records
from hafis.engine.compare.plan import parse_arm
from hafis.engine.compare.pool import Comparison


def _run(out, arm, seed, iterations, last):
    run = out / "runs" / arm / f"seed_{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt_00000002.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"iterations": iterations}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "event": "eval", "miou": 0.5}) + "\n"
                                               for i in range(2, last + 1, 2)))
    (run / "compare_run.json").write_text('{"wall_s": 1.0}\n')
    return run


def test_archive_keeps_the_finished_runs_records_and_the_invocations_that_planned_them(tmp_path):
    out, target = tmp_path / "cmp", tmp_path / "records"
    _run(out, "a", 0, 4, 4)
    _run(out, "a", 1, 4, 2)  # unfinished
    _run(out, "b_x_", 0, 4, 4)
    (out / "detectors" / "k").mkdir(parents=True)
    (out / "detectors" / "k" / "detector.pt").write_bytes(b"x")
    (out / "detectors" / "k" / "detect.log").write_text("trained\n")
    lines = [{"time": "t1", "commit": "c1", "cpu": "X", "arms": ["a"], "seeds": "0,1", "set": "", "threads": 1},
             {"time": "t2", "commit": "c2", "cpu": "X", "arms": ["a", "b(x)"], "seeds": "0", "set": "",
              "precision": "off"}]
    (out / "provenance.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert records.archive(out, target) == 2
    kept = target / "runs" / "a" / "seed_0"
    assert sorted(p.name for p in kept.iterdir()) == ["compare_run.json", "config.yaml", "metrics.jsonl",
                                                        "provenance.json"]
    assert json.loads((kept / "provenance.json").read_text()) == [
        {"time": "t1", "commit": "c1", "cpu": "X", "threads": 1}, {"time": "t2", "commit": "c2", "cpu": "X",
                                                                  "precision": "off"}]
    # the arm "b(x)" lives in the folder b_x_ (compare's slug); only the second invocation planned it
    assert [p["commit"] for p in json.loads((target / "runs" / "b_x_" / "seed_0" / "provenance.json").read_text())
            ] == ["c2"]
    assert not (target / "runs" / "a" / "seed_1").exists()
    assert sorted(p.name for p in (target / "detectors" / "k").iterdir()) == ["detect.log"]
    assert (target / "provenance.jsonl").read_text() == (out / "provenance.jsonl").read_text()

    # a fresh output folder gets the archived runs back (and keeps what it has)
    fresh = tmp_path / "fresh"
    _run(fresh, "a", 0, 4, 2)
    records.restore(fresh, target)
    assert len((fresh / "runs" / "a" / "seed_0" / "metrics.jsonl").read_text().splitlines()) == 1
    assert records.finished(fresh / "runs" / "b_x_" / "seed_0")
    assert not records.finished(fresh / "runs" / "a" / "seed_0")
    assert not (fresh / "runs" / "b_x_" / "seed_0" / "checkpoints").exists()


def test_the_code_of_a_comparison_is_the_package_and_the_config_chain(tmp_path):
    import hafis

    (tmp_path / "base.yaml").write_text("seed: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "exp.yaml").write_text("base: ../base.yaml\n")
    assert records.code_paths(tmp_path / "sub" / "exp.yaml") == [
        Path(hafis.__file__).resolve().parent, (tmp_path / "sub" / "exp.yaml").resolve(),
        (tmp_path / "base.yaml").resolve()]


def test_a_comparison_archives_each_run_as_it_finishes_with_its_provenance(tmp_path, tiny_config):
    """``hafis compare --records``: a run's records are in the folder once it finishes, before the next one trains;
    each invocation's line names its precision, threads, arms, seeds and the machine's ISA flags."""
    out, target = tmp_path / "cmp", tmp_path / "records"
    arms = [parse_arm("a: train.framework=supervised")]
    comparison = Comparison(tiny_config, arms, [0, 1], ["train.iterations=2", "train.amp=off"], out, None, "cmd",
                            log=lambda m: None, records=target)
    seen = []

    def fake_train(args, log_path, env, every=None):
        spec = next(s for s in comparison.specs if f"output_dir={s.run_dir}" in args)
        seen.append(sorted(p.parent.name for p in target.glob("runs/a/*/metrics.jsonl")))
        (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(spec.config)))
        (spec.run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "event": "eval", "miou": 0.5,
                                                                "best_miou": 0.5}) + "\n")
        return 0

    comparison._subprocess = fake_train
    assert comparison.run(jobs=1, threads=1) == 0
    assert seen == [[], ["seed_0"]]  # the first run was archived before the second trained
    line = json.loads((out / "provenance.jsonl").read_text())
    assert line["precision"] == "off" and line["threads"] == 1 and line["arms"] == ["a"] and line["seeds"] == "0,1"
    assert {"commit", "cpu", "cores", "avx512", "bf16", "avx512_bf16", "amx_bf16", "torch"} <= set(line)
    saved = json.loads((target / "runs" / "a" / "seed_1" / "provenance.json").read_text())
    assert saved == [{k: line[k] for k in records.PROVENANCE_KEYS}]
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["provenance"] for r in rows] == [saved, saved] and {r["precision"] for r in rows} == {"off"}
