"""hafis's DeepLabV3+ against UniMatch's released network: same outputs and gradients from the same weights, and the
released checkpoints (segmenter and deep-stem ImageNet backbone) load strictly under their official names."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hafis.models import DeepLabV3Plus
from hafis.models.backbones import build_backbone, load_backbone_weights
from hafis.models.deeplabv3plus import is_unimatch_state_dict, unimatch_state_dict


def _cbr(cin, cout, k=1, d=1):
    return [nn.Conv2d(cin, cout, k, padding=0 if k == 1 else d, dilation=d, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(True)]


class ReleasedDeepLabV3Plus(nn.Module):
    """UniMatch's model/semseg/deeplabv3plus.py, transcribed (module names and forward), on hafis's tiny backbone."""

    def __init__(self, nclass, dilations=(6, 12, 18)):
        super().__init__()
        self.backbone, low, high = build_backbone("resnet_tiny", 16)
        c = high // 8
        self.head = nn.Module()
        self.head.b0 = nn.Sequential(*_cbr(high, c))
        for i, r in enumerate(dilations, 1):
            setattr(self.head, f"b{i}", nn.Sequential(*_cbr(high, c, 3, r)))
        self.head.b4 = nn.Module()
        self.head.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_cbr(high, c))
        self.head.project = nn.Sequential(*_cbr(5 * c, c))
        self.reduce = nn.Sequential(*_cbr(low, 48))
        self.fuse = nn.Sequential(*_cbr(c + 48, 256, 3), *_cbr(256, 256, 3))
        self.classifier = nn.Conv2d(256, nclass, 1, bias=True)

    def _aspp(self, x):
        h = self.head
        feat0, feat1, feat2, feat3 = h.b0(x), h.b1(x), h.b2(x), h.b3(x)
        feat4 = F.interpolate(h.b4.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)
        return h.project(torch.cat((feat0, feat1, feat2, feat3, feat4), 1))

    def _decode(self, c1, c4):
        c4 = self._aspp(c4)
        c4 = F.interpolate(c4, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        c1 = self.reduce(c1)
        return self.classifier(self.fuse(torch.cat([c1, c4], 1)))

    def forward(self, x, need_fp=False):
        h, w = x.shape[-2:]
        c1, c4 = self.backbone(x)
        if need_fp:
            outs = self._decode(torch.cat((c1, nn.Dropout2d(0.5)(c1))), torch.cat((c4, nn.Dropout2d(0.5)(c4))))
            return F.interpolate(outs, size=(h, w), mode="bilinear", align_corners=True).chunk(2)
        return F.interpolate(self._decode(c1, c4), size=(h, w), mode="bilinear", align_corners=True)


def _pair():
    torch.manual_seed(0)
    released = ReleasedDeepLabV3Plus(3)
    for m in released.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    state = {"module." + k: v for k, v in released.state_dict().items()}  # as saved under DDP
    assert is_unimatch_state_dict(state)
    ours = DeepLabV3Plus(3, backbone="resnet_tiny", aspp_channels=16, feature_dim=256)
    ours.load_state_dict(unimatch_state_dict(state))  # strict
    return released, ours


@pytest.mark.parametrize("train", [True, False])
def test_forward_and_gradients_equal_the_released_network(train):
    released, ours = _pair()
    released.train(train), ours.train(train)
    x = torch.randn(2, 3, 45, 51, generator=torch.Generator().manual_seed(1))
    a, b = released(x), ours(x).logits
    assert torch.equal(a, b)
    a.square().mean().backward(), b.square().mean().backward()
    mapped = unimatch_state_dict(dict(released.named_parameters()))
    own = dict(ours.named_parameters())
    for name, p in mapped.items():
        assert torch.equal(own[name].grad, p.grad), name


def test_feature_perturbation_equals_the_released_network():
    released, ours = _pair()
    released.train(), ours.train()
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    pred, pred_fp = released(x, need_fp=True)
    torch.manual_seed(5)
    out = ours(x, feature_perturbation=True)
    assert torch.equal(pred, out.logits) and torch.equal(pred_fp, out.logits_fp)


def test_released_checkpoints_load_strictly_into_resnet50s(tmp_path, official_resnet_keys):
    model = DeepLabV3Plus(21, backbone="resnet50s")
    own = model.state_dict()
    keys = official_resnet_keys((3, 4, 6, 3))
    assert len(keys) - 2 == len([k for k in own if k.startswith("backbone.")])
    g = torch.Generator().manual_seed(0)

    def like(key):
        ref = own.get("backbone." + key)
        shape = (1000, 2048) if key == "fc.weight" else (1000,) if key == "fc.bias" else ref.shape
        return torch.randint(0, 5, shape, generator=g).to(ref.dtype if ref is not None else torch.float32)

    # the ImageNet backbone file the four codebases distribute (a plain state dict, classifier included)
    backbone_file = {k: like(k) for k in keys}
    torch.save(backbone_file, tmp_path / "resnet50.pth")
    backbone, _, _ = build_backbone("resnet50s")
    load_backbone_weights(backbone, tmp_path / "resnet50.pth")
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in backbone_file.items() if not k.startswith("fc."))

    # a UniMatch-released segmenter checkpoint: {'model': DDP state dict}, UniMatch's head / decoder names
    head = {"head.b0.0.weight": (256, 2048, 1, 1), "head.b1.0.weight": (256, 2048, 3, 3),
            "head.b2.0.weight": (256, 2048, 3, 3), "head.b3.0.weight": (256, 2048, 3, 3),
            "head.b4.gap.1.weight": (256, 2048, 1, 1), "head.project.0.weight": (256, 1280, 1, 1),
            "reduce.0.weight": (48, 256, 1, 1), "fuse.0.weight": (256, 304, 3, 3), "fuse.3.weight": (256, 256, 3, 3),
            "classifier.weight": (21, 256, 1, 1), "classifier.bias": (21,)}
    for bn_name, c in (("head.b0.1", 256), ("head.b1.1", 256), ("head.b2.1", 256), ("head.b3.1", 256),
                       ("head.b4.gap.2", 256), ("head.project.1", 256), ("reduce.1", 48), ("fuse.1", 256),
                       ("fuse.4", 256)):
        head.update({f"{bn_name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        head[f"{bn_name}.num_batches_tracked"] = ()
    released = {"module.backbone." + k: v for k, v in backbone_file.items() if not k.startswith("fc.")}
    released |= {"module." + k: torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in head.items()}
    model.load_state_dict(unimatch_state_dict(released))  # strict
    assert torch.equal(model.aspp.branches[4].conv[0].weight, released["module.head.b4.gap.1.weight"])
    assert torch.equal(model.fuse[1][1].running_var, released["module.fuse.4.running_var"])
