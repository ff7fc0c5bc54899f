"""``hafis demo --frameworks``: supervised, then each framework without / with the weighting, in one table."""

from hafis.cli import main

TINY = ["data.synthetic.image_size=32", "data.crop_size=32", "data.synthetic.num_labelled=8",
        "data.synthetic.num_unlabelled=16", "data.synthetic.num_val=4", "train.iterations=2", "train.eval_interval=2",
        "train.log_interval=1", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.progress_bar=false",
        "model.feature_dim=16", "model.aspp_channels=16", "u2pl.sup_only_iterations=1", "eval.batch_size=4"]


def test_demo_frameworks_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--data", "synthetic", "--frameworks", "u2pl,augseg", "--out", str(tmp_path),
                 *TINY]) == 0
    report = (tmp_path / "report.md").read_text()
    table = report[report.index("| framework | mIoU off | mIoU on |"):].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:5]] == ["u2pl", "augseg", "(supervised only)"]
    assert "| u2pl + W (paper: s/k, count) |" in report and "against plain UniMatch" not in report
    arms = ["supervised", "u2pl", "u2pl_+_W__paper__s_k__count_", "augseg", "augseg_+_W__paper__s_k__count_"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(arms)
    assert all((tmp_path / "runs" / arm / "seed_0" / "metrics.jsonl").is_file() for arm in arms)
    capsys.readouterr()
    assert main(["demo", "--frameworks", "u2pl,nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x").exists()
