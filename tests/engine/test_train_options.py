"""``train.channels_last``, ``train.amp=fp16`` and ``train.compile``: each trains a few tiny steps."""

import warnings

import pytest
import torch

from hafis.config import load_config
from hafis.engine.trainer import Trainer

def train(config_path, tmp_path, *overrides, hook=None):
    config = load_config(config_path, ["train.iterations=2", "train.tensorboard=false", f"output_dir={tmp_path}",
                                       *overrides])
    trainer = Trainer(config)
    if hook is not None:
        trainer.model.register_forward_pre_hook(hook)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(trainer.model.parameters(), start))
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
    for (name, a), b in zip(trainer.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, tiny_config, monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    with pytest.warns(UserWarning, match="without native bf16"):
        Trainer(load_config(tiny_config, ["train.amp=bf16", f"output_dir={tmp_path}"]))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(load_config(tiny_config, ["train.amp=bf16", f"output_dir={tmp_path}"]))
