"""A user's mistakes end in one line and exit 2, never a traceback; resume refuses another experiment; checkpoints
cannot run code. Through the command line on the tiny synthetic config."""

import dataclasses
import random
from pathlib import Path
from typing import Optional

import pytest
import torch

from hafis.cli import main
from hafis.config import Config, ConfigError, config_changes, from_dict, load_config, to_dict
from hafis.engine.run_log import read_metrics
from hafis.fields import bounded, nonneg, positive, range_error, relation_errors, unit

TINY = Path(__file__).parent.parent / "configs" / "tiny" / "unimatch.yaml"


def train(*args):
    return main(["train", str(TINY), *map(str, args)])


def one_error_line(capsys, command="train"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hafis {command}: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ ranges and relations
@pytest.mark.parametrize("override,message", [
    ("weighting.k=0", "'weighting.k' must be in (0, inf), got 0"),
    ("weighting.k=100000", "'weighting.k' must be at most 'model.feature_dim' (32), got 100000"),
    ("optim.lr=-1", "'optim.lr' must be in (0, inf), got -1.0"),
    ("data.crop_size=0", "'data.crop_size' must be in [16, 8192], got 0"),
    ("train.batch_size=0", "'train.batch_size' must be in (0, 65536], got 0"),
    ("weighting.memory_per_class=0", "'weighting.memory_per_class' must be in (0, 1048576], got 0"),
    ("train.eval_interval=0", "'train.eval_interval' must be in (0, 1000000000], got 0"),
    ("data.scale_range=[2.0,0.5]", "'data.scale_range' must be in increasing order (low <= high), got (2.0, 0.5)"),
    ("train.iterations=0", "'train.iterations' must be in (0, 1000000000], got 0"),
    ("weighting.offset=-5", "'weighting.offset' must be in [0, inf), got -5.0"),
    ("weighting.tau_seg=1.5", "'weighting.tau_seg' must be in [0, 1], got 1.5"),
    ("train.log_interval=-1", "'train.log_interval' must be in (0, 1000000000], got -1"),
    ("optim.lr=.nan", "'optim.lr' must be finite"),
    ("u2pl.high_rank=2", "'u2pl.high_rank' must be at least 'u2pl.low_rank' (3), got 2"),
    ("ael.paste_exclude=[0,-1]", "'ael.paste_exclude' each value must be in [0, 254], got [0, -1]"),
    ("detector.max_size=10", "'detector.max_size' must be at least 'detector.min_size' (20), got 10"),
])
def test_out_of_range_values_exit_2_naming_key_value_and_range(tmp_path, capsys, override, message):
    assert train(override, "detector.min_size=20", f"output_dir={tmp_path / 'run'}") == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_the_ends_of_each_range_are_accepted():
    config = load_config(TINY, ["weighting.k=32", "weighting.tau_seg=0", "weighting.tau_det=1", "weighting.offset=0",
                                "data.scale_range=[1,1]", "u2pl.high_rank=3", "train.checkpoint_interval=0"])
    assert (config.weighting.k, config.weighting.tau_seg, config.data.scale_range) == (32, 0.0, (1.0, 1.0))


def test_a_new_key_gets_its_check_from_one_word():
    @dataclasses.dataclass
    class Section:
        size: int = positive(3)
        prob: float = unit(0.5)
        pair: tuple[float, float] = bounded((1.0, 2.0), 0, 10, ordered=True)
        limit: Optional[int] = nonneg(None, at_least="s.size")

    @dataclasses.dataclass
    class Root:
        s: Section = dataclasses.field(default_factory=Section)

    fields = {f.name: f for f in dataclasses.fields(Section)}
    assert range_error(fields["size"], 1) is None and range_error(fields["limit"], None) is None
    assert range_error(fields["size"], 0) == "must be in (0, inf), got 0"
    assert range_error(fields["prob"], 1.0000001) == "must be in [0, 1], got 1.0000001"
    assert range_error(fields["pair"], (3.0, 11.0)) == "each value must be in [0, 10], got (3.0, 11.0)"
    assert range_error(fields["pair"], (3.0, 2.0)) == "must be in increasing order (low <= high), got (3.0, 2.0)"
    with pytest.raises(ConfigError, match=r"'s.prob' must be in \[0, 1\], got 2.0"):
        from_dict(Root, {"s": {"prob": 2}}, "test")
    root = Root(Section(size=4, limit=2))
    assert relation_errors(root, lambda key: root.s.size) == ["'s.limit' must be at least 's.size' (4), got 2"]


def test_every_numeric_key_declares_a_range():
    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(type(value), prefix + f.name + ".")
            elif "int" in str(f.type) or "float" in str(f.type):
                yield prefix + f.name, f

    missing = [key for key, f in walk(Config) if "range" not in f.metadata and "choices" not in f.metadata]
    assert missing == []
    # a whole number is a size, count, index or seed: each has a finite upper bound (a huge one would overflow a
    # tensor's size, an index or a generator's seed, or start a billion workers)
    unbounded = [key for key, f in walk(Config) if "int" in str(f.type) and "range" in f.metadata
                 and float(f.metadata["range"][1]) == float("inf") and not f.metadata.get("at_most")]
    assert unbounded == []


def test_the_largest_seed_holds_after_the_streams_add_their_offsets():
    """Seeds are at most 2^63 - 1: torch's generators take the sampler's ``seed + 1 + epoch`` and numpy's the
    ``[seed, stream, epoch, index]`` of every sample, so a first batch of each stream is drawn."""
    from hafis.engine.trainer import Trainer
    from hafis.fields import MAX_SEED

    assert MAX_SEED == 2**63 - 1
    trainer = Trainer(load_config(TINY, [f"seed={MAX_SEED}", f"data.synthetic.seed={MAX_SEED}"]))
    labelled, unlabelled = trainer._streams()
    assert next(labelled)["image"].shape[0] == 2 and next(unlabelled)["weak"].shape[0] == 2
    torch.Generator().manual_seed(MAX_SEED + 2 + 10**9)  # the mix stream's order after 10^9 epochs
    with pytest.raises(ConfigError, match=r"'seed' must be in \[0, 9223372036854775807\], got 9223372036854775808"):
        load_config(TINY, [f"seed={MAX_SEED + 1}"])


# ----------------------------------------------------------------------------------------------------- resume
@pytest.fixture()
def finished_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(f"output_dir={run_dir}") == 0
    capsys.readouterr()
    return run_dir


def snapshot(run_dir):
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def test_resume_refuses_a_changed_experiment_listing_each_key(finished_run, capsys):
    before = snapshot(finished_run)
    assert train(f"output_dir={finished_run}", "train.framework=supervised", "optim.lr=0.02", "--resume") == 2
    line = one_error_line(capsys)
    assert "train.framework: 'unimatch' -> 'supervised'" in line and "optim.lr: 0.01 -> 0.02" in line
    assert snapshot(finished_run) == before


def test_resume_accepts_runtime_changes(finished_run, capsys):
    assert train(f"output_dir={finished_run}", "train.log_interval=2", "train.keep_checkpoints=3",
                 "train.progress_bar=true", "train.eval_interval=1", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert not any(r.get("event") == "resume_with_changes" for r in read_metrics(finished_run / "metrics.jsonl"))


def test_iterations_need_allow_change_which_is_recorded(finished_run, capsys):
    assert train(f"output_dir={finished_run}", "train.iterations=4", "--resume") == 2
    assert "train.iterations: 3 -> 4" in one_error_line(capsys)
    assert train(f"output_dir={finished_run}", "train.iterations=4", "--resume", "--allow-change",
                 "train.iterations") == 0
    records = read_metrics(finished_run / "metrics.jsonl")
    changes = [r for r in records if r.get("event") == "resume_with_changes"]
    assert changes == [{"iteration": 3, "event": "resume_with_changes",
                        "changed": {"train.iterations": {"old": 3, "new": 4}}}]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_an_allowed_model_change_is_a_mismatch_naming_keys_and_shapes(finished_run, capsys):
    assert train(f"output_dir={finished_run}", "model.feature_dim=16", "--resume", "--allow-change", "model") == 2
    line = one_error_line(capsys)
    assert "does not fit the model" in line and "checkpoint (32, " in line and "vs model (16, " in line


def test_eval_of_another_model_names_keys_shapes_and_the_config_key(finished_run, capsys):
    checkpoint = finished_run / "checkpoints" / "ckpt_00000003.pt"
    assert main(["eval", str(TINY), "model.feature_dim=16", "--checkpoint", str(checkpoint)]) == 2
    line = one_error_line(capsys, "eval")
    assert "vs model (16, " in line and "model.feature_dim: 32 in the checkpoint, 16 here" in line


def test_config_changes_treats_unknown_keys_as_changes_and_runtime_keys_as_free():
    config = Config()
    old = to_dict(config)
    old["garments"] = {"size": 3}  # a section this version does not know
    old["train"]["log_interval"] = 99
    old["train"]["iterations"] = 7
    del old["weighting"]["k"]
    changes = config_changes(old, config)
    assert changes == {"train.iterations": (7, 1000), "weighting.k": ("<absent>", 5),
                       "garments.size": (3, "<absent>")}
    assert config_changes(to_dict(config), config) == {}


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="weighting.k"):
        train("weighting.k=0", f"output_dir={tmp_path / 'run'}", "--debug")


# ----------------------------------------------------------------------------------------- checkpoint safety
class _CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_by_eval_and_resume(finished_run, tmp_path, capsys):
    marker = tmp_path / "created_by_unpickling"
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": {}, "iteration": 1, "payload": _CreatesAFile(marker)}, crafted)

    assert main(["eval", str(TINY), "--checkpoint", str(crafted)]) == 2
    assert "arbitrary pickled objects" in one_error_line(capsys, "eval")
    assert not marker.exists()

    newest = finished_run / "checkpoints" / "ckpt_00000009.pt"  # --resume picks the newest file of the run
    newest.write_bytes(crafted.read_bytes())
    before = snapshot(finished_run)
    assert train(f"output_dir={finished_run}", "--resume") == 2
    line = one_error_line(capsys)
    assert "arbitrary pickled objects" in line and str(newest) in line
    assert not marker.exists()
    assert snapshot(finished_run) == before  # not skipped in favour of the older checkpoint


@pytest.mark.parametrize("framework", ["supervised", "unimatch", "u2pl", "ael", "augseg"])
def test_every_checkpoint_loads_with_weights_only(tmp_path, capsys, framework):
    run_dir = tmp_path / "run"
    assert train(f"train.framework={framework}", "weighting.enabled=true", "train.iterations=1",
                 "train.eval_interval=1", f"output_dir={run_dir}") == 0
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000001.pt", weights_only=True)
    assert state["config"]["train"]["framework"] == framework and state["iteration"] == 1
    assert state["class_names"] == ["background", "disc", "square", "triangle"]  # what predict / export check


def test_the_empty_split_error_describes_the_split(tmp_path, capsys):
    assert train("data.synthetic.num_unlabelled=0", f"output_dir={tmp_path / 'run'}") == 2
    line = one_error_line(capsys)
    assert "SyntheticScenes(unlabelled, 0 images, seed=0)" in line and "object at" not in line


# ------------------------------------------------------------------------------------------------------ fuzz
def _keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _keys(value, prefix + key + ".")
        else:
            yield prefix + key


VALUES = ["abc", "", "[]", "{}", "-1", "0", "1", "0.5", "1.5", "-0.5", "1000000000", "-1000000000", "1e30",
          ".nan", ".inf", "-.inf", "true", "null", "[1, 2]", "[2, 1]", "[-1, 5]", "{a: 1}", "'[1'", "1e-4"]


def test_fuzz_every_key_ends_in_exit_0_or_2_and_writes_nothing_on_2(tmp_path, capsys, monkeypatch):
    """Random overrides of every key: the config and everything the trainer builds from it either accept the value
    or stop with one line and exit 2. Training itself is stubbed (a huge valid value such as 10^9 iterations would
    run for ever); training with valid values is what the rest of the suite runs."""
    from hafis.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "train", lambda self: None)
    rng = random.Random(0)
    outcomes = {}
    for i, key in enumerate(_keys(to_dict(Config()))):
        if key in ("output_dir", "name"):
            continue
        for j, value in enumerate(["", "-1", "1000000000", *rng.sample(VALUES, 2)]):  # empty, out of range, huge,
            run_dir = tmp_path / f"run{i}_{j}"  # random; a run that starts claims its folder
            code = train(f"{key}={value}", f"output_dir={run_dir}")
            captured = capsys.readouterr()
            assert code in (0, 2), (key, value, captured.err[-2000:])
            if code == 2:
                assert len(captured.err.strip().splitlines()) == 1, (key, value, captured.err)
                assert not run_dir.exists(), (key, value)
            outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes.get(0, 0) > 0 and outcomes.get(2, 0) > 0
