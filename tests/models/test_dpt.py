"""The dpt segmenter (DINOv2 + DPT): shapes, the weighting's feature, Meta's weight layout, crops of 14."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hafis.config import ConfigError, load_config
from hafis.engine.build import build_model
from hafis.models import SEGMENTERS
from hafis.models.dpt import DPT, DinoV2Encoder, build_dinov2, load_dinov2_weights


def tiny(num_classes=5, **kw):
    torch.manual_seed(0)
    return DPT(num_classes, backbone="dinov2_tiny", feature_dim=16, **kw)


def test_shapes_and_the_feature_the_weighting_reads():
    model = tiny().eval()
    seen = {}
    model.head.output.register_forward_hook(lambda m, i, o: seen.setdefault("relu", o.clone()))
    x = torch.randn(2, 3, 42, 56)  # a 3 x 4 patch grid
    out = model(x)
    assert out.logits.shape == (2, 5, 42, 56) and out.logits_fp is None
    # the decoder runs at 8x the patch grid; the feature is the output block's ReLU, `feature_dim` channels
    assert out.features.shape == (2, 16, 24, 32)
    assert torch.equal(out.features, seen["relu"]) and out.features.min() >= 0
    # logits: the 1x1 classifier of that feature, resized to the input with align_corners=True
    expected = F.interpolate(model.head.classifier(out.features), size=(42, 56), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.logits, expected)


def test_levels_of_the_decoder_have_the_dpt_strides():
    model = tiny().eval()
    feats = model.backbone(torch.randn(1, 3, 70, 42))  # a 5 x 3 grid: the stride-2 level rounds up
    assert [f.shape[-2:] for f in feats] == [(5, 3)] * 4 and feats[0].shape[1] == 32
    levels = list(zip(feats, model.head.project, model.head.resize, strict=True))
    sizes = [res(proj(f)).shape[-2:] for f, proj, res in levels]
    assert sizes == [(20, 12), (10, 6), (5, 3), (3, 2)]
    assert [res(proj(f)).shape[1] for f, proj, res in levels] == [8, 16, 32, 32]


def test_inputs_off_the_patch_grid_are_resized_to_the_nearest_multiple_and_back():
    model = tiny().eval()
    x = torch.randn(1, 3, 37, 48)  # -> 42 x 42 inside (37/14 = 2.6 -> 3 patches, 48/14 = 3.4 -> 3)
    out = model(x)
    assert out.logits.shape == (1, 5, 37, 48) and out.features.shape == (1, 16, 24, 24)
    inner = model(F.interpolate(x, size=(42, 42), mode="bilinear", align_corners=True))
    torch.testing.assert_close(out.logits, F.interpolate(inner.logits, size=(37, 48), mode="bilinear",
                                                         align_corners=True))


def _bicubic_1d(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """The (n_out, n_in) matrix of PyTorch's bicubic resize (a = -0.75, half-pixel centres, clamped borders)."""
    a, m = -0.75, np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        f = int(np.floor(src))
        t = src - f
        for k, d in zip(range(f - 1, f + 3), (1 + t, t, 1 - t, 2 - t), strict=True):
            w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            m[i, min(max(k, 0), n_in - 1)] += w
    return m


def test_position_embedding_follows_dinov2_resize():
    encoder = tiny().backbone
    pos = encoder.model.pos_embed.detach()
    assert encoder.grid == 4 and torch.equal(encoder.position_embedding(4, 4), encoder.model.pos_embed)
    out = encoder.position_embedding(3, 6).detach()
    assert out.shape == (1, 1 + 18, 32) and torch.equal(out[:, 0], pos[:, 0])  # the class token's is kept
    grid = pos[0, 1:].reshape(4, 4, 32).double().numpy()
    rows, cols = _bicubic_1d(4, 3, 3.1 / 4), _bicubic_1d(4, 6, 6.1 / 4)  # DINOv2's scale (grid + 0.1) / 4
    expected = np.einsum("ih,jw,hwc->ijc", rows, cols, grid).reshape(18, 32)
    np.testing.assert_allclose(out[0, 1:].double().numpy(), expected, atol=1e-5)


def test_feature_mask_scales_encoder_channels_per_image():
    model = tiny().eval()
    x = torch.randn(2, 3, 28, 28)
    ones = model(x, feature_mask=torch.ones(2, 32))
    torch.testing.assert_close(ones.logits, model(x).logits)
    mask = torch.ones(2, 32)
    mask[1, :16] = 0.0
    out = model(x, feature_mask=mask)
    torch.testing.assert_close(out.logits[0], ones.logits[0])
    assert not torch.allclose(out.logits[1], ones.logits[1])


def test_feature_perturbation_keeps_the_clean_half():
    model = tiny().train()
    x = torch.randn(2, 3, 28, 28)
    fp = model(x, feature_perturbation=True)
    torch.testing.assert_close(fp.logits, model(x).logits)
    assert fp.logits_fp.shape == fp.logits.shape and not torch.allclose(fp.logits_fp, fp.logits)


def test_param_groups_and_freeze_encoder():
    model = tiny()
    groups = model.param_groups(5e-6, 40.0, 0.01)
    assert [g["lr"] for g in groups] == [5e-6, 5e-6 * 40] and all(g["weight_decay"] == 0.01 for g in groups)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    frozen = tiny(freeze_encoder=True)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    groups = frozen.param_groups(5e-6, 40.0, 0.01)
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in frozen.head.parameters()}
    frozen(torch.randn(1, 3, 28, 28)).logits.sum().backward()
    assert frozen.backbone.model.cls_token.grad is None and frozen.head.classifier.weight.grad is not None


def meta_vits14_state(seed=0) -> dict:
    """Meta's dinov2_vits14_pretrain.pth layout, written from DINOv2's release (names and shapes), random values."""
    g = torch.Generator().manual_seed(seed)
    d, shapes = 384, {"cls_token": (1, 1, 384), "pos_embed": (1, 37 * 37 + 1, 384), "mask_token": (1, 384),
                      "patch_embed.proj.weight": (384, 3, 14, 14), "patch_embed.proj.bias": (384,),
                      "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                       b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                       b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def test_meta_vits14_file_loads_strictly_and_mismatches_are_named(tmp_path):
    state = meta_vits14_state()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    model = DPT(21, backbone="dinov2_small", feature_dim=64, pretrained_path=str(path))
    loaded = model.backbone.model.state_dict()
    assert set(loaded) == set(state) - {"mask_token"}
    for key in ("pos_embed", "blocks.11.mlp.fc2.weight", "blocks.3.ls1.gamma", "patch_embed.proj.weight"):
        assert torch.equal(loaded[key], state[key]), key
    assert model(torch.randn(1, 3, 56, 42)).logits.shape == (1, 21, 56, 42)  # a 4 x 3 grid: embedding resized
    encoder = model.backbone

    def fails(broken: dict, match: str):
        bad = tmp_path / "bad.pth"
        torch.save(broken, bad)
        with pytest.raises(ValueError, match=match) as info:
            load_dinov2_weights(encoder, bad)
        assert str(bad) in str(info.value)

    fails({k: v for k, v in state.items() if k != "blocks.7.attn.qkv.bias"},
          r"missing \(1\): blocks\.7\.attn\.qkv\.bias")
    fails({**state, "blocks.12.norm1.weight": torch.zeros(384)}, r"unexpected \(1\): blocks\.12\.norm1\.weight")
    fails({**state, "norm.bias": torch.zeros(768)}, r"'norm\.bias' has shape \(768,\)")
    # a UniMatch V2 release (a DDP-wrapped whole DPT) seeds the encoder from its backbone.* keys
    whole = {"model": {**{f"module.backbone.{k}": v for k, v in state.items()}, "module.head.x.weight": torch.ones(1)}}
    torch.save(whole, tmp_path / "released.pth")
    load_dinov2_weights(encoder, tmp_path / "released.pth")


def test_weights_unavailable_names_the_file_to_place(monkeypatch, tmp_path):
    def offline(*args, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(*args, **kw)

    real = __import__("timm").create_model
    monkeypatch.setattr("hafis.models.dpt.timm.create_model", offline)
    overrides = ["model.name=dpt", "model.backbone=dinov2_base", "data.crop_size=518", "model.pretrained=dinov2"]
    with pytest.raises(ConfigError, match=r"dinov2_vitb14_pretrain\.pth") as info:
        build_model(load_config(None, overrides), 3)
    assert "\n" not in str(info.value) and "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/" in str(info.value)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ConfigError, match=f"{missing} does not exist.*dinov2_vitb14_pretrain.pth"):
        build_model(load_config(None, overrides + [f"model.pretrained_path={missing}"]), 3)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_dinov2("dinov2_tiny", "dinov2")


def test_config_refuses_crops_and_windows_off_the_patch_grid():
    with pytest.raises(ConfigError, match=r"^defaults: 'data.crop_size' must be a multiple of 14 .*got 512$"):
        load_config(None, ["model.name=dpt", "data.crop_size=512"])
    with pytest.raises(ConfigError, match=r"'eval.window' must be a multiple of 14"):
        load_config(None, ["model.name=dpt", "data.crop_size=518", "eval.window=800"])
    load_config(None, ["data.crop_size=512"])  # other segmenters take any crop
    with pytest.raises(ConfigError, match="freeze_encoder"):
        build_model(load_config(None, ["model.freeze_encoder=true"]), 3)


def test_registered_and_built_from_a_config():
    assert SEGMENTERS["dpt"] is DPT
    model = build_model(load_config(None, ["model.name=dpt", "model.backbone=dinov2_tiny", "model.feature_dim=16",
                                           "data.crop_size=56", "model.freeze_encoder=true"]), 3)
    assert isinstance(model.backbone, DinoV2Encoder) and model.align_corners is True
    assert not any(p.requires_grad for p in model.backbone.parameters())
