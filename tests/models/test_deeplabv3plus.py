"""DeepLabV3+ and backbones: shapes, UniMatch feature perturbation, param groups, weight loading."""

import math

import pytest
import timm
import torch
from torch import nn

from hafis.models import BACKBONES, DeepLabV3Plus, SegOutput, build_backbone, build_segmenter


def tiny(**kw) -> DeepLabV3Plus:
    kw = dict(backbone="resnet_tiny", feature_dim=32, aspp_channels=32) | kw
    return DeepLabV3Plus(3, **kw)


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 70)])
def test_output_shapes(output_stride, size):
    torch.manual_seed(0)
    model = tiny(output_stride=output_stride).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, SegOutput) and out.logits_fp is None
    assert out.logits.shape == (2, 3, h, w)
    # Stride 4: two stride-2 stages (stem conv, max-pool), each rounding up.
    assert out.features.shape == (2, 32, math.ceil(h / 4), math.ceil(w / 4))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_strides(output_stride):
    backbone, low_ch, high_ch = build_backbone("resnet_tiny", output_stride=output_stride)
    low, high = backbone(torch.randn(1, 3, 64, 64))
    assert (low_ch, high_ch) == (16, 128)
    assert low.shape == (1, 16, 16, 16)
    assert high.shape == (1, 128, 64 // output_stride, 64 // output_stride)


def test_output_stride_8_doubles_dilations():
    dil = [b[0].dilation[0] for b in tiny(output_stride=8).aspp.branches[1:4]]
    assert dil == [12, 24, 36]


def test_resnet18_builds_with_torchvision_keys():
    backbone, low_ch, high_ch = build_backbone("resnet18", pretrained=None)
    assert (low_ch, high_ch) == (64, 512)
    keys = backbone.state_dict().keys()
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_feature_perturbation_clean_half_unchanged_in_eval():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        fp = model(x, feature_perturbation=True)
    # Same values up to float rounding (the doubled batch may pick another conv kernel).
    torch.testing.assert_close(fp.logits, plain.logits)
    torch.testing.assert_close(fp.features, plain.features)
    assert fp.logits_fp.shape == plain.logits.shape
    torch.testing.assert_close(fp.logits_fp, plain.logits)  # Dropout2d is identity in eval


def test_feature_perturbation_train_differs_and_backprops_to_backbone():
    torch.manual_seed(0)
    model = tiny().train()
    freeze_bn(model)  # remove the doubled-batch BatchNorm statistics from the comparison
    out = model(torch.randn(2, 3, 64, 64), feature_perturbation=True)
    assert out.logits.shape == out.logits_fp.shape == (2, 3, 64, 64)
    assert not torch.allclose(out.logits, out.logits_fp)
    out.logits_fp.sum().backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_param_groups_partition_parameters():
    model = tiny()
    groups = model.param_groups(0.01, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.01, 0.1])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as-is


def test_pretrained_path_loads_wrapped_prefixed_state_dict(tmp_path):
    torch.manual_seed(0)
    source = tiny()
    state = {"module." + k: v for k, v in source.backbone.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 128)  # classifier keys are dropped
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": state}, path)

    torch.manual_seed(1)
    loaded = tiny(pretrained_path=str(path))
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k


def test_pretrained_path_key_mismatch_names_file_and_key(tmp_path):
    backbone, _, _ = build_backbone("resnet_tiny")
    state = backbone.state_dict()
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        tiny(pretrained_path=path)
    msg = str(err.value)
    assert str(path) in msg and "layer2.0.conv1.weight" in msg and "extra.weight" in msg


def test_pretrained_imagenet_offline_is_a_value_error_naming_the_way_out(monkeypatch):
    import socket

    from hafis.models import backbones

    real = timm.create_model

    def offline(*args, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(*args, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(backbones, "check_fetchable", lambda *a: None)
    with pytest.raises(ValueError, match="OSError: no network; supply a local file instead with model.pretrained_path"):
        build_backbone("resnet18", pretrained="imagenet")
    monkeypatch.undo()

    def unreachable(*args, **kwargs):  # no network: refused at once, before timm's minute of retries
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm, "create_model", offline)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # nothing cached
    with pytest.raises(ValueError) as err:
        build_backbone("resnet18", pretrained="imagenet")
    assert str(err.value) == ("could not fetch ImageNet weights for backbone 'resnet18' (timm 'resnet18.tv_in1k'): "
                              "not in the Hugging Face cache and huggingface.co is unreachable (Name or service not "
                              "known); supply a local file with model.pretrained_path=/path/to/file.pth")


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as err:
        build_backbone("vgg16")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="deeplabv3plus"):
        build_segmenter("unet", num_classes=3)


def test_build_segmenter():
    model = build_segmenter("deeplabv3plus", 5, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
    assert isinstance(model, DeepLabV3Plus)
    assert model.classifier.out_channels == 5
