"""hafis compare's tables over result rows: contrasts along the schedule, per-arm tables, against hand computations."""

import math
import statistics

import pytest

from hafis.cli import main
from hafis.config import ConfigError
from hafis.engine.compare.plan import parse_arm
from hafis.engine.compare.pool import Comparison
from hafis.engine.compare.tables import arm_table, contrast_table, miou_at, parse_contrast, parse_fractions

#: two-sided 95 % Student t quantile (tables), df = 1
T95_1 = 12.706204736


def _row(arm, seed, curve, best):
    return {"arm": arm, "seed": seed, "iterations": 8, "miou_at": {str(k): v for k, v in curve.items()},
            "miou": curve[8], "best_miou": best, "last_quarter_change": None}


ROWS = [_row("A", 0, {2: 0.30, 4: 0.40, 6: 0.45, 8: 0.50}, 0.50), _row("A", 1, {2: 0.32, 4: 0.41, 8: 0.52}, 0.53),
        _row("A", 2, {2: 0.31, 8: 0.51}, 0.51),
        _row("B", 0, {2: 0.20, 4: 0.35, 8: 0.47}, 0.48), _row("B", 1, {2: 0.25, 4: 0.36, 8: 0.49}, 0.50)]


def _cell(diffs):
    """mean (lo, hi) of paired differences in points, the t interval by hand (df = 1 here)."""
    m = sum(diffs) / len(diffs)
    half = T95_1 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{m:+.1f} ({m - half:+.1f}, {m + half:+.1f})"


def test_a_contrast_pairs_the_seeds_both_arms_finished_along_the_schedule():
    assert miou_at(ROWS[1], 0.75) == 0.41  # the last evaluation at or before iteration 6
    lines = contrast_table(ROWS, [("A", "B"), ("B", "missing")], (0.25, 0.5))
    assert lines[0].endswith("at 1/4 and 1/2 of the schedule, at its end and of the best evaluation:")
    assert lines[2:4] == ["| paired difference | n | Δ at 1/4 | Δ at 1/2 | Δ final | Δ best |",
                          "|---|---|---|---|---|---|"]
    # seeds 0 and 1: at 1/4 (iteration 2) 10 and 7 points; at 1/2 (iteration 4) 5 and 5; final 3 and 3; best 2, 3
    assert lines[4:] == [f"| A − B | 2 | {_cell([10, 7])} | {_cell([5, 5])} | {_cell([3, 3])} | {_cell([2, 3])} |"]
    assert _cell([10, 7]) == "+8.5 (-10.6, +27.6)"
    one = contrast_table(ROWS, [("A", "B")], (0.75,))
    # at 3/4 (iteration 6): seed 0 45 - 35 (B's last evaluation by then is at 4), seed 1 41 - 36
    assert "at 3/4 of the schedule" in one[0] and one[-1].startswith(f"| A − B | 2 | {_cell([10, 5])} |")
    three = contrast_table([r for r in ROWS if r["seed"] == 0], [("A", "B")], (0.25, 0.5, 0.75))
    assert "at 1/4, 1/2 and 3/4 of the schedule" in three[0]
    assert three[-1] == "| A − B | 1 | +10.0 (n = 1) | +5.0 (n = 1) | +10.0 (n = 1) | +3.0 (n = 1) | +2.0 (n = 1) |"


def test_the_arm_table_is_mean_and_std_over_the_seeds():
    # A: 50, 52, 51 -> 51.0 ± 1.0; best 50, 53, 51 -> 51.3 ± 1.5; B: 47, 49 -> 48.0 ± 1.4
    assert arm_table(ROWS, ["A", "B", "C"])[2:] == ["| A | 3 | 51.0 ± 1.0 | 51.3 ± 1.5 | – |",
                                                    "| B | 2 | 48.0 ± 1.4 | 49.0 ± 1.4 | – |"]


def test_contrast_and_fraction_options():
    assert parse_contrast("a:b: c", ["a:b", "c"]) == ("a:b", "c")
    assert parse_contrast(" x : y", ["x", "y"]) == ("x", "y")
    for bad in ("x", "x:z", ":y"):
        with pytest.raises(ConfigError, match="--contrast"):
            parse_contrast(bad, ["x", "y"])
    assert parse_fractions("0.25, 0.5") == (0.25, 0.5)
    for bad in ("", "0", "1", "0.5,x"):
        with pytest.raises(ConfigError, match="--at"):
            parse_fractions(bad)


def _fake_run(out, arm, seed, curve, best):
    import json

    run = out / "runs" / arm / f"seed_{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "event": "eval", "miou": m,
                                                           "best_miou": best, "labelled": 4}) + "\n"
                                               for i, m in curve.items()))


def test_the_report_has_the_contrasts_section_and_the_plan_keeps_it(tmp_path, tiny_config):
    out = tmp_path / "cmp"
    for r in ROWS[:2] + ROWS[3:]:
        _fake_run(out, r["arm"], r["seed"], {int(k): v for k, v in r["miou_at"].items()}, r["best_miou"])
    arms = [parse_arm("A: train.framework=supervised"), parse_arm("B: train.framework=supervised")]
    comparison = Comparison(tiny_config, arms, [0, 1], ["train.iterations=8"], out, None, "cmd",
                            contrasts=[("A", "B")], fractions=(0.25,))
    report = comparison.write_outputs()
    section = report[report.index("## Contrasts"):].splitlines()
    assert f"| A − B | 2 | {_cell([10, 7])} | {_cell([3, 3])} | {_cell([2, 3])} |" in section
    comparison.save_plan()
    again = Comparison.from_plan(out)
    assert again.contrasts == [("A", "B")] and again.fractions == (0.25,)
    plain = Comparison(tiny_config, arms, [0, 1], ["train.iterations=8"], out, None, "cmd").write_outputs()
    assert "## Contrasts" not in plain
    with pytest.raises(ConfigError, match="--contrast: 'C' is not an arm"):
        Comparison(tiny_config, arms, [0], [], out, None, "cmd", contrasts=[("A", "C")])


def test_a_bad_contrast_is_one_line_before_anything_runs(tmp_path, capsys, tiny_config):
    assert main(["compare", str(tiny_config), "--arm", "a: train.framework=supervised", "--contrast", "a:zz",
                 "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--contrast 'a:zz'" in err and not (tmp_path / "cmp").exists()
