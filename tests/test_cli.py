"""End to end through the command line, on tiny synthetic data (a few seconds per run)."""

import json

import pytest

from hafis.cli import main
from hafis.engine.run_log import read_metrics


@pytest.mark.parametrize("framework", ["supervised", "unimatch"])
@pytest.mark.parametrize("weighting", ["false", "true"])
def test_train_then_eval_reproduces_the_logged_miou(tmp_path, capsys, framework, weighting, tiny_config):
    run_dir = tmp_path / "run"
    code = main(["train", str(tiny_config), f"train.framework={framework}",
                 f"weighting.enabled={weighting}", f"output_dir={run_dir}"])
    assert code == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    assert len(evals) == 1 and evals[0]["iteration"] == 3
    if framework == "unimatch":
        assert {"loss_s1", "loss_s2", "loss_fp", "mask_ratio"} <= set(steps[0])
    assert ("weight_mean" in steps[0]) == (framework == "unimatch" and weighting == "true")
    checkpoint = run_dir / "checkpoints" / "ckpt_00000003.pt"
    assert checkpoint.is_file()
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tensorboard").iterdir())
    capsys.readouterr()

    assert main(["eval", str(tiny_config), "--checkpoint", str(checkpoint)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["miou"] == evals[0]["miou"]
    assert result["iou"] == evals[0]["iou"]


def test_training_is_deterministic_on_cpu(tmp_path, tiny_config):
    runs = []
    for name in ("a", "b"):
        assert main(["train", str(tiny_config), "weighting.enabled=true",
                     f"output_dir={tmp_path / name}"]) == 0
        runs.append([{k: v for k, v in r.items() if k != "seconds_per_iteration"}
                     for r in read_metrics(tmp_path / name / "metrics.jsonl")])
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "override,message",
    [("train.iteratons=3", "unknown key 'train.iteratons'"), ("train.iterations=abc", "must be int")],
)
def test_config_errors_exit_2_and_write_nothing(tmp_path, capsys, override, message, tiny_config):
    run_dir = tmp_path / "run"
    code = main(["train", str(tiny_config), override, f"output_dir={run_dir}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_eval_of_a_missing_checkpoint_names_it(tmp_path, capsys, tiny_config):
    missing = tmp_path / "nope.pt"
    assert main(["eval", str(tiny_config), "--checkpoint", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_an_empty_split_is_named_not_a_traceback(tmp_path, capsys, tiny_config):
    code = main(["train", str(tiny_config), "data.synthetic.num_unlabelled=0",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "the unlabelled split is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_overrides_may_follow_the_options(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    assert main(["train", str(tiny_config), "--nproc", "1", "train.iterations=2", "train.eval_interval=1",
                 f"output_dir={run_dir}"]) == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if r.get("event") == "eval"] == [1, 2]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]


@pytest.mark.parametrize("argv,stray", [
    (["train", "{config}", "--nproc", "1", "stray"], "stray"),  # not key=value
    (["train", "{config}", "train.iterations=2", "--bogus", "output_dir={out}"], "--bogus"),
    (["compare", "{config}", "--arm", "a:", "--out", "{out}", "train.iterations=2"], "train.iterations=2"),
])
def test_stray_arguments_are_a_usage_error_before_anything_runs(tmp_path, capsys, tiny_config, argv, stray):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([a.format(config=tiny_config, out=out) for a in argv])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {stray}" in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("release", ["u2pl", "ael"])
def test_eval_of_a_released_u2pl_or_ael_checkpoint(tmp_path, capsys, tiny_config, release):
    """The releases' files: ``{'model_state', 'teacher_state', ...}`` (U2PL) or ``{'model_state', ...}`` (AEL, whose
    model_state is the teacher), DDP-prefixed, AEL's decoder as ``tail`` / ``final``."""
    import torch

    from hafis.config import load_config
    from hafis.data import build_sources
    from hafis.engine.build import build_model
    from hafis.engine.checkpoint import load_checkpoint

    overrides = ["model.decoder=released", "model.feature_dim=256", f"train.framework={release}",
                 "model.aux_weight=0.4"]
    config = load_config(tiny_config, overrides)
    torch.manual_seed(3)
    model = build_model(config, build_sources(config.data)[2].num_classes)
    state = {}
    for k, v in model.state_dict().items():
        if release == "ael" and k.startswith("decoder.classifier."):
            index, rest = k.removeprefix("decoder.classifier.").split(".", 1)
            k = "decoder.final." + rest if index == "8" else f"decoder.tail.{index}.{rest}"
        state["module." + k] = v
    file = {"epoch": 80, "model_state": state, "optimizer_state": {}}
    if release == "u2pl":  # the student under model_state, the evaluated teacher under teacher_state
        file = {**file, "model_state": {k: torch.zeros_like(v) for k, v in state.items()}, "teacher_state": state}
    torch.save(file, tmp_path / "ckpt.pth")
    loaded = load_checkpoint(tmp_path / "ckpt.pth")["model"]  # the teacher, whichever entry holds it
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert main(["eval", str(tiny_config), *overrides, "--checkpoint", str(tmp_path / "ckpt.pth")]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["miou"] <= 1
