"""U2PL, AEL and AugSeg through ``hafis train`` / ``hafis eval`` on the tiny synthetic config (well under a second a
run): checkpoints, the teacher as the evaluated model, bit-identical losses with the plug-in path at W = 1, resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from hafis.cli import main
from hafis.engine.run_log import read_metrics

TINY = Path(__file__).parent.parent.parent / "configs" / "tiny" / "unimatch.yaml"
FRAMEWORKS = ["u2pl", "ael", "augseg"]
COMMON = ["u2pl.sup_only_iterations=1", "weighting.reliable=confidence", "train.tensorboard=false"]
#: the plug-in path with no prototype ever (nothing qualifies for the bank) and offset 1: W = 1 everywhere
W_ONE = ["weighting.enabled=true", "weighting.offset=1", "weighting.labelled_threshold=1.0", "weighting.tau_seg=1.0"]
EXPECTED_TERMS = {"u2pl": {"loss_u", "loss_contra"}, "ael": {"loss_cons_l", "loss_cons_u"}, "augseg": {"loss_u"}}


def train(run_dir, framework, *overrides):
    assert main(["train", str(TINY), f"train.framework={framework}", *COMMON, f"output_dir={run_dir}",
                 *overrides]) == 0
    return read_metrics(run_dir / "metrics.jsonl")


def losses(records):
    return [{k: v for k, v in r.items() if k not in ("seconds_per_iteration", "weight_mean")} for r in records]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("weighting", ["false", "true"])
def test_train_writes_a_checkpoint_of_the_teacher_and_eval_reproduces_it(tmp_path, capsys, framework, weighting):
    run_dir = tmp_path / "run"
    records = train(run_dir, framework, f"weighting.enabled={weighting}")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["iteration"] for r in steps] == [1, 2, 3] and len(evals) == 1
    assert EXPECTED_TERMS[framework] <= set(steps[-1])
    assert ("weight_mean" in steps[-1]) == (weighting == "true")
    checkpoint = run_dir / "checkpoints" / "ckpt_00000003.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    teacher = state["framework"]["teacher"]
    prefix = "segmenter." if framework == "u2pl" else ""
    for key, value in state["model"].items():  # "the model" is the EMA teacher
        assert torch.equal(value, teacher[prefix + key])
    assert state["framework"]["ema_updates"] == (2 if framework == "u2pl" else 3)
    capsys.readouterr()
    assert main(["eval", str(TINY), "--checkpoint", str(checkpoint)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["miou"] == evals[0]["miou"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_weighting_path_with_unit_weights_is_bit_identical(tmp_path, framework):
    thresholds = ["ael.threshold=0.3", "augseg.threshold=0.5"]  # so that the unsupervised terms are not all 0
    plain = train(tmp_path / "off", framework, *thresholds)
    unit = train(tmp_path / "on", framework, *thresholds, *W_ONE)
    steps = [r for r in unit if "loss" in r]
    assert all("weight_mean" in r for r in steps[framework == "u2pl":])
    unsup = sorted(EXPECTED_TERMS[framework])[-1]
    assert any(r.get(unsup, 0) > 0 for r in steps)
    assert losses(plain) == losses(unit)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_replays_the_uninterrupted_run(tmp_path, framework):
    extra = ["train.iterations=4", "train.eval_interval=2", "weighting.enabled=true"]
    full = train(tmp_path / "full", framework, *extra)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    (resumed_dir / "checkpoints" / "ckpt_00000004.pt").unlink()
    assert main(["train", str(TINY), f"train.framework={framework}", *COMMON, f"output_dir={resumed_dir}",
                 *extra, "--resume"]) == 0
    resumed = read_metrics(resumed_dir / "metrics.jsonl")
    tail = [r for r in losses(full) if r["iteration"] > 2]
    assert tail and [r for r in losses(resumed) if r["iteration"] > 2][-len(tail):] == tail


def test_detector_verified_bank_through_the_three_frameworks(tmp_path, capsys):
    """weighting.reliable: detector: the weak view's box masks reach the bank (one detector serves the three)."""
    detector = ["weighting.enabled=true", "weighting.reliable=detector", "weighting.stuff=confidence",
                "weighting.tau_seg=0.0", "weighting.tau_det=0.0", "weighting.labelled_threshold=0.0",
                "detector.arch=tiny", "detector.iterations=2", "detector.batch_size=2",
                f"detector.output_dir={tmp_path / 'detector'}"]
    assert main(["detect", str(TINY), *COMMON, *detector, f"output_dir={tmp_path / 'det'}"]) == 0
    for framework in FRAMEWORKS:
        train(tmp_path / framework, framework, *detector)
        state = torch.load(tmp_path / framework / "checkpoints" / "ckpt_00000003.pt", map_location="cpu",
                           weights_only=False)
        assert state["framework"]["weighting"]["bank.unlabelled.count"].sum() > 0
    capsys.readouterr()
