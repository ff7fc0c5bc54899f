"""SegFormer: the segmenter interface (logits, features, feature perturbation, param groups) and weight loading."""

from __future__ import annotations

import re

import pytest
import torch

from hafis.models import SEGMENTERS, build_segmenter
from hafis.models.segformer import SegFormer


def tiny(num_classes=5, **kw):
    torch.manual_seed(0)
    return SegFormer(num_classes, backbone="mit_tiny", feature_dim=16, **kw)


def test_outputs_match_the_deeplab_interface_on_odd_sizes():
    model = tiny().eval()
    x = torch.randn(2, 3, 37, 45)
    out = model(x)
    assert out.logits.shape == (2, 5, 37, 45)
    assert out.features.shape == (2, 16, 10, 12)  # ceil(H / 4), ceil(W / 4), feature_dim channels
    assert out.logits_fp is None
    fp = model(x, feature_perturbation=True)
    torch.testing.assert_close(fp.logits, out.logits)  # the clean half is untouched
    torch.testing.assert_close(fp.features, out.features)
    torch.testing.assert_close(fp.logits_fp, out.logits)  # eval mode: no dropout


def test_feature_perturbation_perturbs_in_training():
    model = tiny(fp_dropout=0.5).train()
    fp = model(torch.randn(2, 3, 32, 32), feature_perturbation=True)
    assert fp.logits_fp.shape == fp.logits.shape
    assert not torch.allclose(fp.logits_fp, fp.logits)
    (fp.logits.mean() + fp.logits_fp.mean()).backward()
    assert model.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_param_groups_split_encoder_and_decoder():
    model = tiny()
    groups = model.param_groups(0.01, 10.0, 1e-4)
    assert [g["lr"] for g in groups] == [0.01, 0.1] and [g["initial_lr"] for g in groups] == [0.01, 0.1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in model.backbone.parameters()} == {id(p) for p in groups[0]["params"]}


def test_registered_and_built_from_config_kwargs():
    assert "segformer" in SEGMENTERS
    model = build_segmenter("segformer", 3, backbone="mit_tiny", feature_dim=8, fp_dropout=0.5, pretrained=None,
                            pretrained_path=None)
    with pytest.raises(TypeError, match="output_stride"):  # a DeepLab key is not a SegFormer argument
        build_segmenter("segformer", 3, backbone="mit_tiny", output_stride=16)
    # inputs below the encoder's 32 px minimum are padded inside and cropped back
    out = model(torch.zeros(1, 3, 16, 18))
    assert out.features.shape == (1, 8, 4, 5) and out.logits.shape == (1, 3, 16, 18)


def test_mit_sizes():
    encoder = SegFormer(19, backbone="mit_b0").backbone
    n = sum(p.numel() for p in encoder.parameters())
    assert 3.2e6 < n < 3.5e6  # MiT-B0: 3.3 M encoder parameters
    assert encoder.channels == [32, 64, 160, 256]


def _original_keys(state: dict) -> dict:
    """timm PVTv2 keys -> the original PVTv2 / SegFormer MiT naming (patch_embed1, block1.0, norm1, dwconv.dwconv)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stages\.(\d+)\.downsample", lambda m: f"patch_embed{int(m.group(1)) + 1}", k)
        k = k.replace("patch_embed.", "patch_embed1.") if k.startswith("patch_embed.") else k
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}", k)
        k = re.sub(r"^stages\.(\d+)\.norm", lambda m: f"norm{int(m.group(1)) + 1}", k)
        out[k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = v
    return out


def test_loads_an_original_mit_checkpoint_and_names_mismatches(tmp_path):
    source = tiny()
    state = _original_keys(source.backbone.model.state_dict())
    assert "block1.0.mlp.dwconv.dwconv.weight" in state and "patch_embed2.proj.weight" in state
    state["head.weight"] = torch.zeros(1000, 64)  # the ImageNet classifier of the released files is dropped
    path = tmp_path / "mit_tiny.pth"
    torch.save({"state_dict": state}, path)
    loaded = tiny(pretrained_path=path)
    for (k, a), b in zip(source.backbone.model.state_dict().items(), loaded.backbone.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k

    torch.save(SegFormer(2, backbone="mit_b0").backbone.model.state_dict(), tmp_path / "b0.pth")
    with pytest.raises(ValueError, match=r"unexpected \(76\): stages\.0\.blocks\.1\."):  # B0 is deeper
        tiny(pretrained_path=tmp_path / "b0.pth")
    state["patch_embed1.proj.weight"] = torch.zeros(4, 3, 7, 7)
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="wrong shapes"):
        tiny(pretrained_path=tmp_path / "narrow.pth")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"does not match the encoder's keys\n  missing"):
        tiny(pretrained_path=tmp_path / "junk.pth")


def test_mit_imagenet_weights_need_a_local_file():
    with pytest.raises(ValueError, match="pretrained_path"):
        SegFormer(2, backbone="mit_tiny", pretrained="imagenet")
    with pytest.raises(ValueError, match="unknown SegFormer encoder"):
        SegFormer(2, backbone="resnet50")
