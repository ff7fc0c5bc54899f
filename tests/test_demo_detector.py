
from hafis.demo import run_demo
from hafis.demo.detector import DETECTOR_RUN

TINY = ["data.synthetic.image_size=32", "data.crop_size=32", "data.synthetic.num_labelled=8",
        "data.synthetic.num_unlabelled=16", "data.synthetic.num_val=4", "train.iterations=2", "train.eval_interval=2",
        "train.log_interval=1", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.progress_bar=false",
        "detector.iterations=2", "detector.batch_size=2", "weighting.tau_det=0.0", "weighting.tau_seg=0.0",
        "model.feature_dim=16", "model.aspp_channels=16"]


def test_full_demo_runs_the_detector_verified_run(tmp_path):
    records = run_demo(tmp_path, quick=False, overrides=TINY, log=lambda m: None, data="synthetic")
    assert [r.label for r in records][-1] == DETECTOR_RUN[0] and len(records) == 5
    detector_run = records[-1]
    # with tau_seg = tau_det = 0 and a box everywhere the detector saw anything, some probe pixels are reliable
    assert detector_run.quality[-1]["reliable_share"] > 0
    assert (tmp_path / "detections.png").stat().st_size > 0
    assert (tmp_path / "detector" / "detector.pt").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "## Detector-verified prototypes" in report and "confidence + detector" in report


def test_quick_demo_is_three_runs(tmp_path):
    records = run_demo(tmp_path, quick=True, overrides=TINY, log=lambda m: None, data="synthetic")
    assert [r.label.split(" (")[0] for r in records] == ["supervised", "unimatch", "unimatch + W"]
    assert not (tmp_path / "detector").exists()
    report = (tmp_path / "report.md").read_text()
    assert "| supervised |" in report
    assert (tmp_path / "miou.png").is_file() and (tmp_path / "pseudo_labels.png").is_file()
    assert (tmp_path / "diagnostics.png").is_file() and (tmp_path / "results.json").is_file()
