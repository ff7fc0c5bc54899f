"""``train.channels_last``, ``train.amp`` (fp16, bf16, auto) and ``train.compile``: each trains a few tiny steps."""

import json
import warnings

import pytest
import torch

from hafis.config import ConfigError, load_config
from hafis.engine.run_log import read_metrics
from hafis.engine.trainer import Trainer


def train(config_path, tmp_path, *overrides, hook=None):
    config = load_config(config_path, ["train.iterations=2", "train.tensorboard=false", f"output_dir={tmp_path}",
                                       *overrides])
    trainer = Trainer(config)
    if hook is not None:
        trainer.model.register_forward_pre_hook(hook)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(trainer.model.parameters(), start, strict=True))
    return trainer, result, moved


def test_channels_last_converts_the_inputs_as_well_as_the_model(tmp_path, tiny_config):
    seen = []

    def record(module, args):
        if module.training:
            seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and args[0].stride(1) == 1)

    trainer, _, moved = train(tiny_config, tmp_path, "train.channels_last=true", hook=record)
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen and all(seen), seen  # every training forward (UniMatch: two a step) got channels-last images
    assert moved > 0


def test_fp16_trains_with_a_grad_scaler(tmp_path, tiny_config, conv_output_dtypes):
    trainer, result, moved = train(tiny_config, tmp_path, "train.amp=fp16")
    assert conv_output_dtypes == {torch.float16}  # every convolution of the training forwards ran in fp16
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0
    assert moved > 0 and 0 <= result.miou <= 1
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in trainer.model.parameters()])).all()


def test_compile_trains_like_the_eager_model(tmp_path, tiny_config, monkeypatch):
    # aot_eager traces forward and backward as inductor does, without its C++ code generation (minutes on CPU)
    compiled = []
    original = torch.nn.Module.compile

    def compile_cheaply(module, **kwargs):
        compiled.append(module)
        return original(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_cheaply)
    trainer, _, moved = train(tiny_config, tmp_path / "compiled", "train.compile=true")
    assert compiled == [trainer.model] and moved > 0
    eager, _, _ = train(tiny_config, tmp_path / "eager")
    for (name, a), b in zip(trainer.model.state_dict().items(), eager.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"avx512f"}))
    with pytest.warns(UserWarning, match="without native bf16"):
        Trainer(load_config(tiny_config, ["train.amp=bf16", f"output_dir={tmp_path}"]))
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(load_config(tiny_config, ["train.amp=bf16", f"output_dir={tmp_path}"]))


def test_auto_trains_in_the_precision_the_cpu_computes_natively(tmp_path, tiny_config, monkeypatch, capsys,
                                                                 conv_output_dtypes):
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    trainer, _, _ = train(tiny_config, tmp_path / "native", "train.iterations=1", "train.amp=auto")
    assert trainer.amp == "bf16" and conv_output_dtypes == {torch.bfloat16} and not trainer.scaler.is_enabled()
    assert "precision: bf16 (train.amp=auto: CPU flag(s) avx512_bf16)\n" in capsys.readouterr().out
    record = json.loads((tmp_path / "native" / "provenance.jsonl").read_text())
    assert {k: record[k] for k in ("iteration", "device", "processes", "amp", "precision", "precision_reason")} == {
        "iteration": 0, "device": "cpu", "processes": 1, "amp": "auto", "precision": "bf16",
        "precision_reason": "train.amp=auto: CPU flag(s) avx512_bf16"}
    state = torch.load(tmp_path / "native" / "checkpoints" / "ckpt_00000001.pt", weights_only=True)
    assert state["amp"] == "bf16"

    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"avx512f"}))
    conv_output_dtypes.clear()
    trainer, _, _ = train(tiny_config, tmp_path / "emulated", "train.iterations=1", "train.amp=auto")
    assert trainer.amp == "off" and conv_output_dtypes == {torch.float32}


@pytest.mark.cuda
def test_auto_on_this_gpu_trains_in_bf16_from_compute_capability_8(tmp_path, tiny_config, conv_output_dtypes):
    trainer, result, moved = train(tiny_config, tmp_path, "train.iterations=1", "train.amp=auto", "train.device=cuda")
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert trainer.amp == ("bf16" if native else "off")
    assert conv_output_dtypes == {torch.bfloat16 if native else torch.float32} and moved > 0


def test_resume_refuses_a_change_of_the_resolved_precision(tmp_path, tiny_config, monkeypatch):
    """``auto`` trained in bf16 on one machine; resumed where it means off, the run would change precision: refused
    with the key named, unless ``--allow-change train.amp``, and then the new precision is recorded."""
    args = ["train.iterations=2", "train.eval_interval=1", "train.tensorboard=false", "train.amp=auto",
            f"output_dir={tmp_path}"]
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"amx_bf16"}))
    first = Trainer(load_config(tiny_config, args[:1] + ["train.iterations=1"] + args[1:]))
    first.train()
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset())
    resumed = Trainer(load_config(tiny_config, args))
    with pytest.raises(ConfigError) as refused:
        resumed.resume()
    assert ("the config changed the experiment (train.iterations: 1 -> 2; train.amp: 'auto (bf16)' -> 'auto (off: "
            "the CPU has no avx512_bf16 or amx_bf16)')") in str(refused.value)
    assert resumed.resume(allow_change=("train.iterations", "train.amp")) is not None and resumed.amp == "off"
    resumed.train()
    assert [json.loads(line)["precision"] for line in (tmp_path / "provenance.jsonl").read_text().splitlines()] == \
        ["bf16", "off"]
    changed = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "resume_with_changes"]
    assert changed[0]["changed"]["train.amp"]["old"] == "auto (bf16)"
    monkeypatch.setattr("hafis.precision.cpu_flags", lambda: frozenset({"amx_bf16"}))  # back on the first machine
    again = Trainer(load_config(tiny_config, args))
    with pytest.raises(ConfigError, match=r"train.amp: 'auto \(off\)' -> 'auto \(bf16: CPU flag\(s\) amx_bf16\)'"):
        again.resume()
