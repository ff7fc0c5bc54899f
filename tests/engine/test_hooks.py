"""The trainer's hooks: the documented order, and a periodic action added as one more hook."""

import pytest

from hafis.config import load_config
from hafis.engine.hooks import Checkpointer, Evaluation, Hook, MetricWriter, OnEval, PolyLR, ReplicaSync, default_hooks
from hafis.engine.run_log import read_metrics
from hafis.engine.trainer import Trainer


class Recorder(Hook):
    """What the trainer shows a hook, call by call."""

    def __init__(self):
        self.calls = []
        self.seen_eval = None

    def before_train(self, trainer):
        self.calls.append(("before_train", trainer.iteration))

    def before_step(self, trainer):
        self.calls.append(("before_step", trainer.iteration, trainer.optimizer.param_groups[0]["lr"]))

    def after_step(self, trainer, step):
        evaluated = trainer.last_eval is not None and trainer.last_eval is not self.seen_eval  # a new evaluation
        self.seen_eval = trainer.last_eval
        self.calls.append(("after_step", trainer.iteration, float(step.loss), evaluated))

    def after_train(self, trainer):
        self.calls.append(("after_train", trainer.iteration))


def test_default_hooks_are_in_the_documented_order(tmp_path, tiny_config):
    trainer = Trainer(load_config(tiny_config, ["train.tensorboard=false", f"output_dir={tmp_path}"]))
    assert [type(h) for h in trainer.hooks] == [PolyLR, MetricWriter, ReplicaSync, Evaluation, Checkpointer, OnEval]
    sync, evaluation, checkpointer = trainer.hooks[2:5]
    assert sync.before == (evaluation, checkpointer)  # the replicas agree before either acts
    assert [type(h) for h in default_hooks(trainer)] == [type(h) for h in trainer.hooks]


def test_an_added_hook_sees_every_step_with_its_rate_loss_and_evaluations(tmp_path, tiny_config):
    config = load_config(tiny_config, ["train.tensorboard=false", f"output_dir={tmp_path}", "train.iterations=3",
                                       "train.eval_interval=2", "optim.lr=0.01", "optim.poly_power=1.0"])
    trainer = Trainer(config)
    recorder = Recorder()
    trainer.hooks.append(recorder)
    trainer.train()
    train_records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    steps = [c for c in recorder.calls if c[0] == "after_step"]
    assert recorder.calls[0] == ("before_train", 0) and recorder.calls[-1] == ("after_train", 3)
    assert [c[0] for c in recorder.calls[1:-1]] == ["before_step", "after_step"] * 3
    # UniMatch's lr_lag 1: step t at the poly rate of t - 1 (1 - it/3 with power 1), set before the hook runs
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.01
    rates = [c[2] for c in recorder.calls if c[0] == "before_step"]
    assert rates == pytest.approx([0.01, 0.01, 0.01 * (1 - 1 / 3)])
    assert [c[1] for c in steps] == [1, 2, 3]
    assert [c[2] for c in steps] == pytest.approx([r["loss"] for r in train_records])  # the logged step
    assert [c[3] for c in steps] == [False, True, True]  # after the evaluations of iterations 2 and 3


def test_after_train_runs_when_a_step_fails(tmp_path, tiny_config, monkeypatch):
    trainer = Trainer(load_config(tiny_config, ["train.tensorboard=false", f"output_dir={tmp_path}"]))
    recorder = Recorder()
    trainer.hooks.append(recorder)

    def fail(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(trainer, "run_step", fail)
    with pytest.raises(RuntimeError, match="step failed"):
        trainer.train()
    assert recorder.calls == [("before_train", 0), ("before_step", 0, recorder.calls[1][2]), ("after_train", 0)]
