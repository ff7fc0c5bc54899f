"""``model.decoder: released`` and ``model.multi_grid`` against the U2PL / AEL releases' networks: the same outputs
and gradients from the same weights, released state dicts (key names and shapes) loading strictly, and the released
multi-grid dilations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hafis.config import ConfigError, load_config
from hafis.engine.build import build_model
from hafis.models.backbones import build_backbone
from hafis.models.released import ReleasedDeepLabV3Plus, released_state_dict


def _cbr(cin, cout, k, d=1, bias=False):
    return [nn.Conv2d(cin, cout, k, padding=d if k == 3 else 0, dilation=d, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class U2PLNetwork(nn.Module):
    """U2PL's ModelBuilder with dec_deeplabv3_plus (rep_head) and Aux_Module (u2pl/models/{base,decoder,
    model_helper}.py), transcribed: module names and forward; AEL's decoder is the same with its classifier split
    into ``tail`` and ``final`` (``ael=True``). The encoder is hafis's tiny ResNet (layers 1, 3, 4 out)."""

    def __init__(self, nclass, dilations=(12, 24, 36), ael=False, rep=True, aux=True):
        super().__init__()
        self.ael = ael
        self.encoder, low, high = build_backbone("resnet_tiny", 8, out_indices=(1, 3, 4))
        self.encoder.maxpool.ceil_mode = True
        mid = self.encoder.feature_info.channels()[1]
        d = self.decoder = nn.Module()
        d.aspp = nn.Module()
        d.aspp.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), *_cbr(high, 256, 1))
        d.aspp.conv2 = nn.Sequential(*_cbr(high, 256, 1))
        for i, r in enumerate(dilations, 3):
            setattr(d.aspp, f"conv{i}", nn.Sequential(*_cbr(high, 256, 3, r)))
        d.head = nn.Sequential(*_cbr(1280, 256, 3), nn.Dropout2d(0.1))
        d.low_conv = nn.Sequential(nn.Conv2d(low, 256, kernel_size=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        trunk = [*_cbr(512, 256, 3, bias=True), nn.Dropout2d(0.1), *_cbr(256, 256, 3, bias=True), nn.Dropout2d(0.1)]
        if ael:
            d.tail = nn.Sequential(*trunk)
            d.final = nn.Conv2d(256, nclass, 1)
        else:
            d.classifier = nn.Sequential(*trunk, nn.Conv2d(256, nclass, 1))
        if rep:
            d.representation = nn.Sequential(*_cbr(512, 256, 3, bias=True), nn.Dropout2d(0.1),
                                             *_cbr(256, 256, 3, bias=True), nn.Dropout2d(0.1), nn.Conv2d(256, 256, 1))
        if aux:
            self.auxor = nn.Module()
            self.auxor.aux = nn.Sequential(nn.Conv2d(mid, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
                                           nn.Dropout2d(0.1), nn.Conv2d(256, nclass, 1))

    def forward(self, x):
        h, w = x.shape[-2:]
        x1, x3, x4 = self.encoder(x)
        d = self.decoder
        a = d.aspp
        aspp_out = torch.cat((F.interpolate(a.conv1(x4), size=x4.shape[-2:], mode="bilinear", align_corners=True),
                              a.conv2(x4), a.conv3(x4), a.conv4(x4), a.conv5(x4)), 1)
        low_feat = d.low_conv(x1)
        aspp_out = d.head(aspp_out)
        aspp_out = F.interpolate(aspp_out, size=low_feat.shape[-2:], mode="bilinear", align_corners=True)
        aspp_out = torch.cat((low_feat, aspp_out), dim=1)
        pred = d.final(d.tail(aspp_out)) if self.ael else d.classifier(aspp_out)
        rep = d.representation(aspp_out) if hasattr(d, "representation") else None
        aux = self.auxor.aux(x3) if hasattr(self, "auxor") else None
        up = dict(mode="bilinear", align_corners=True)
        return F.interpolate(pred, (h, w), **up), rep, None if aux is None else F.interpolate(aux, (h, w), **up)


def _pair(ael=False):
    torch.manual_seed(0)
    released = U2PLNetwork(3, ael=ael, rep=not ael)
    for m in released.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    ours = ReleasedDeepLabV3Plus(3, backbone="resnet_tiny", output_stride=8, multi_grid=False, aux_head=True,
                                 representation=not ael)
    state = {"module." + k: v for k, v in released.state_dict().items()}  # as saved under DDP
    ours.load_state_dict(released_state_dict(state))  # strict
    return released, ours


@pytest.mark.parametrize("ael", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_forward_and_gradients_equal_the_released_network(train, ael):
    released, ours = _pair(ael)
    released.train(train), ours.train(train)
    x = torch.randn(2, 3, 45, 51, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)  # the same dropout draws, in the released order (head, classifier, representation, aux)
    pred, rep, aux = released(x)
    torch.manual_seed(3)
    out = ours(x)
    assert torch.equal(pred, out.logits) and torch.equal(aux, out.aux)
    assert (rep is None and out.rep is None) or torch.equal(rep, out.rep)
    loss_a = pred.square().mean() + aux.abs().mean() + (0 if rep is None else rep.square().mean())
    loss_b = out.logits.square().mean() + out.aux.abs().mean() + (0 if out.rep is None else out.rep.square().mean())
    loss_a.backward(), loss_b.backward()
    own = dict(ours.named_parameters())
    for name, p in released_state_dict(dict(released.named_parameters())).items():
        assert torch.equal(own[name].grad, p.grad), name
    assert out.features.shape[1] == 256  # the decoder feature the weighting reads: the classifier's input


def _released_head_shapes(nclass, rep, aux, ael=False):
    """The decoder / auxiliary keys and shapes of a released U2PL (or AEL) ResNet-101 checkpoint."""
    shapes = {"decoder.aspp.conv1.1.weight": (256, 2048, 1, 1), "decoder.aspp.conv2.0.weight": (256, 2048, 1, 1),
              "decoder.aspp.conv3.0.weight": (256, 2048, 3, 3), "decoder.aspp.conv4.0.weight": (256, 2048, 3, 3),
              "decoder.aspp.conv5.0.weight": (256, 2048, 3, 3), "decoder.head.0.weight": (256, 1280, 3, 3),
              "decoder.low_conv.0.weight": (256, 256, 1, 1), "decoder.low_conv.0.bias": (256,)}
    bns = ["decoder.aspp.conv1.2", "decoder.aspp.conv2.1", "decoder.aspp.conv3.1", "decoder.aspp.conv4.1",
           "decoder.aspp.conv5.1", "decoder.head.1", "decoder.low_conv.1"]
    heads = [("decoder.tail" if ael else "decoder.classifier", nclass)] + ([("decoder.representation", 256)] * rep)
    for name, out in heads:
        shapes |= {f"{name}.0.weight": (256, 512, 3, 3), f"{name}.0.bias": (256,), f"{name}.4.weight": (256, 256, 3, 3),
                   f"{name}.4.bias": (256,)}
        bns += [f"{name}.1", f"{name}.5"]
        last = "decoder.final" if ael and name == "decoder.tail" else f"{name}.8"
        shapes |= {f"{last}.weight": (out, 256, 1, 1), f"{last}.bias": (out,)}
    if aux:
        shapes |= {"auxor.aux.0.weight": (256, 1024, 3, 3), "auxor.aux.0.bias": (256,),
                   "auxor.aux.4.weight": (nclass, 256, 1, 1), "auxor.aux.4.bias": (nclass,)}
        bns.append("auxor.aux.1")
    for b in bns:
        shapes |= {f"{b}.{p}": (256,) for p in ("weight", "bias", "running_mean", "running_var")}
        shapes[f"{b}.num_batches_tracked"] = ()
    return shapes


@pytest.mark.parametrize("kind", ["u2pl_voc", "u2pl_cityscapes", "ael"])
def test_released_checkpoints_load_strictly(kind, official_resnet_keys):
    nclass, rep, aux, ael = {"u2pl_voc": (21, True, False, False), "u2pl_cityscapes": (19, True, True, False),
                             "ael": (21, False, True, True)}[kind]
    model = ReleasedDeepLabV3Plus(nclass, backbone="resnet101s", output_stride=8, aux_head=aux, representation=rep)
    own = model.state_dict()
    g = torch.Generator().manual_seed(0)
    encoder = {k: own[f"encoder.{k}"] for k in official_resnet_keys((3, 4, 23, 3))[:-2]}  # no classifier
    state = {f"module.encoder.{k}": torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(7)
             for k, v in encoder.items()}
    state |= {f"module.{k}": torch.randn(s, generator=g) if s else torch.tensor(3)
              for k, s in _released_head_shapes(nclass, rep, aux, ael).items()}
    model.load_state_dict(released_state_dict(state))  # strict: every key, every shape
    last = "module.decoder.final.weight" if ael else "module.decoder.classifier.8.weight"
    assert torch.equal(model.decoder.classifier[8].weight, state[last])
    assert torch.equal(model.encoder.layer4[2].conv2.weight, state["module.encoder.layer4.2.conv2.weight"])


def _released_multi_grid(output_stride, blocks=3):
    """u2pl/models/resnet.py _make_layer: layer4's 3x3 dilations with multi_grid (grids [2, 2, 4])."""
    dilation = 1
    out = {}
    for layer, dilate in zip((2, 3, 4), (False, output_stride == 8, True), strict=True):
        previous = dilation
        if dilate:
            dilation *= 2
        grids = [2, 2, 4] if layer == 4 else [1] * blocks
        out[layer] = [previous * grids[0]] + [dilation * grids[i] for i in range(1, blocks)]
    return out[4]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_multi_grid_dilations_are_the_released_ones(output_stride):
    backbone, _, _ = build_backbone("resnet50s", output_stride, multi_grid=True)
    got = [b.conv2.dilation[0] for b in backbone.layer4]
    assert got == _released_multi_grid(output_stride) == ([4, 8, 16] if output_stride == 8 else [2, 4, 8])
    assert all(b.conv2.padding == b.conv2.dilation for b in backbone.layer4)
    plain, _, _ = build_backbone("resnet50s", output_stride)
    assert [b.conv2.dilation[0] for b in plain.layer4] == ([2, 4, 4] if output_stride == 8 else [1, 2, 2])


def test_config_builds_the_released_network_and_refuses_what_does_not_fit():
    base = ["model.backbone=resnet_tiny", "model.decoder=released", "model.output_stride=8"]
    model = build_model(load_config(None, [*base, "train.framework=u2pl", "model.aux_weight=0.4"]), 3)
    assert isinstance(model, ReleasedDeepLabV3Plus) and model.has_representation and model.auxor is not None
    model = build_model(load_config(None, [*base, "train.framework=ael"]), 3)
    assert not model.has_representation and model.auxor is None
    with pytest.raises(ConfigError, match="feature_dim=32"):
        build_model(load_config(None, [*base, "train.framework=ael", "model.feature_dim=32"]), 3)
    with pytest.raises(ConfigError, match="fit train.framework='unimatch'$"):
        build_model(load_config(None, base), 3)
    with pytest.raises(ConfigError, match="aux_weight"):
        build_model(load_config(None, ["model.backbone=resnet_tiny", "model.aux_weight=0.4"]), 3)
    with pytest.raises(ConfigError, match="multi_grid"):
        build_model(load_config(None, ["model.name=segformer", "model.backbone=mit_tiny", "model.multi_grid=true"]), 3)
