"""``hafis export``: the saved graph reproduces the torch network, checked here with onnxruntime run independently."""

from __future__ import annotations

import importlib.util

import onnx
import onnxruntime
import pytest
import torch

from hafis.cli import main
from hafis.config import load_config, to_dict
from hafis.engine import export
from hafis.engine.build import build_model

# ImageNet statistics written out here, so the check does not reuse the normalisation under test
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = build_model(config, 4)
    with torch.no_grad():  # logits of a few units, as a trained network gives, and masks that vary
        model.classifier.weight.normal_(0, 2.0)
    return model.eval()


def _dynamic_dims(path):
    """The input's and the output's dimensions as the file declares them: names where dynamic, sizes where fixed."""
    graph = onnx.load(str(path)).graph
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (graph.input[0],
                                                                                         graph.output[0])]


def _images(batch, h, w, seed):
    return torch.randint(0, 256, (batch, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@torch.no_grad()
def _compare(model, run, sizes):
    """``[(max |logit difference|, argmax agreement), ...]`` of ``run`` (uint8 in, logits out) against ``model``."""
    out = []
    for seed, (batch, h, w) in enumerate(sizes):
        images = _images(batch, h, w, 100 + seed)
        expected = model((images.float() / 255 - MEAN) / STD).logits
        got = torch.as_tensor(run(images))
        assert got.shape == expected.shape == (batch, 4, h, w)
        out.append((float((got - expected).abs().max()), float((got.argmax(1) == expected.argmax(1)).float().mean())))
    return out


def _onnxruntime(path):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].type == "tensor(uint8)"
    return lambda images: session.run(["logits"], {"images": images.numpy()})[0]


def test_deeplab_onnx_export_through_the_cli(tmp_path, capsys, tiny_config):
    config = load_config(tiny_config)
    model = _model(config)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(config)}, checkpoint)
    out = tmp_path / "model.onnx"
    assert main(["export", str(tiny_config), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "opset 18" in printed and printed.count("argmax agreement") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "model.onnx"]  # no temporary file left
    for diff, agreement in _compare(model, _onnxruntime(out), [(1, 32, 32), (2, 45, 61), (3, 64, 33)]):
        assert diff <= 1e-4 and agreement >= 0.999
    assert _dynamic_dims(out) == [["batch", 3, "height", "width"], ["batch", 4, "height", "width"]]


def test_the_demos_network_exports_for_sides_multiple_of_32(tmp_path, tiny_config):
    """DeepLabV3+ on EfficientNet-Lite0 (the demo's network; its TF padding is fixed for multiples of 32): checked
    on sizes and batches neither the trace nor the command's check used; the report times each phase."""
    config = load_config(tiny_config, ["model.backbone=efficientnet_lite0", "model.feature_dim=16",
                                       "model.aspp_channels=16"])
    model = _model(config)
    report = export.export_model(model, tmp_path / "lite0.onnx", "onnx", 64, log=None)
    assert report.step == 32 and [r.size for r in report.parity] == [(64, 64), (96, 128)]
    assert set(report.seconds) == {"export", "session", "parity"} and all(v > 0 for v in report.seconds.values())
    for diff, agreement in _compare(model, _onnxruntime(tmp_path / "lite0.onnx"), [(3, 64, 96), (1, 192, 64)]):
        assert diff <= 1e-4 and agreement >= 0.999
    assert _dynamic_dims(tmp_path / "lite0.onnx")[0] == ["batch", 3, "height", "width"]


def test_dpt_is_refused_in_one_error(tmp_path, tiny_config):
    config = load_config(tiny_config, ["model.name=dpt", "model.backbone=dinov2_tiny", "data.crop_size=28"])
    with pytest.raises(export.ExportError, match="cannot be traced for dynamic image sizes"):
        export.export_model(_model_without_classifier_tweak(config), tmp_path / "dpt.onnx", "onnx", 28, log=None)
    assert list(tmp_path.iterdir()) == []


def _model_without_classifier_tweak(config):
    torch.manual_seed(0)
    return build_model(config, 4).eval()


@pytest.mark.parametrize("step,crop", [(1, 32), (1, 64), (14, 28), (32, 32), (32, 64), (32, 512)])
def test_the_trace_size_is_none_of_the_checked_sizes(step, crop):
    """A size the trace fixes as a constant then fails the check instead of passing it."""
    sizes = export.check_sizes(step, crop)
    h, w = export.trace_size(step, sizes)
    assert h % step == 0 and w % step == 0 and h != w and min(h, w) >= export.MIN_SIDE
    assert all((h, w) not in (s, s[::-1]) for _, s in sizes)


def test_segformer_onnx_export_on_two_sizes(tmp_path, tiny_config):
    config = load_config(tiny_config, ["model.name=segformer", "model.backbone=mit_tiny"])
    model = _model(config)
    results = export.export_model(model, tmp_path / "seg.onnx", "onnx", 32, log=None).parity
    assert [r.size for r in results] == [(64, 64), (96, 128)]  # SegFormer: sides multiples of 32
    for diff, agreement in _compare(model, _onnxruntime(tmp_path / "seg.onnx"), [(2, 64, 64), (1, 96, 128)]):
        assert diff <= 1e-4 and agreement >= 0.999


def test_a_mismatch_fails_loudly_and_writes_nothing(tmp_path, capsys, tiny_config, monkeypatch):
    config = load_config(tiny_config)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": _model(config).state_dict()}, checkpoint)
    run = export.onnx_runner
    monkeypatch.setattr(export, "onnx_runner", lambda path: (lambda x: run(path)(x) + 0.01))
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(tiny_config), "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match torch" in err[0] and "0.01" in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_without_the_extra_one_line_names_it(tmp_path, capsys, tiny_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name,
                                                                                                              *a))
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_config), "--checkpoint", str(tmp_path / "any.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "onnxruntime" in err and "pip install 'hafis[export]'" in err and "\n" not in err
    assert not out.exists()


def test_check_sizes_respect_the_size_step():
    assert export.check_sizes(1, 32) == [(2, (32, 32)), (1, (51, 37))]
    assert all(h % 32 == 0 and w % 32 == 0 and min(h, w) >= 64 for _, (h, w) in export.check_sizes(32, 50))
    assert export.check_sizes(32, 512)[0] == (2, (512, 512))
