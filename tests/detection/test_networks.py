import numpy as np
import pytest
import torch

from hafis.data.synthetic import SyntheticConfig, SyntheticScenes
from hafis.detection.infer import detect
from hafis.detection.networks import build_detector
from hafis.detection.train import DetectionDataset, train_detector


def test_build_detector_archs_without_downloads():
    model = build_detector("resnet50_fpn", 3, min_size=64, max_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(ValueError, match="unknown detector arch"):
        build_detector("yolo", 3)
    with pytest.raises(ValueError, match="at least one thing class"):
        build_detector("tiny", 0)


def test_efficientnet_lite0_detector_starts_from_imagenet_with_frozen_batchnorm():
    from hafis.models.backbones import efficientnet_lite0_classifier

    torch.manual_seed(0)
    model = build_detector("efficientnet_lite0", 2, min_size=48, max_size=48)
    classifier = efficientnet_lite0_classifier()  # the package's weights through the classifier's own loading
    trunk = model.backbone.trunk
    assert torch.equal(trunk.conv_stem.weight, classifier.conv_stem.weight)
    assert torch.equal(trunk.blocks[5][0].conv_pw.weight, classifier.blocks[5][0].conv_pw.weight)
    assert model.backbone.out_channels == 320
    bn_stats = {k: v.clone() for k, v in trunk.state_dict().items() if k.endswith("running_mean")}
    assert bn_stats and torch.equal(bn_stats["bn1.running_mean"], classifier.bn1.running_mean)

    source = SyntheticScenes(SyntheticConfig(image_size=48, num_labelled=8, num_unlabelled=1, num_val=1,
                                             num_object_classes=2, max_objects=3), "labelled", cache_dir=False)
    losses = train_detector(model, DetectionDataset(source, source.thing_classes, seed=0), 12, batch_size=4,
                            lr=1e-4, seed=0)
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    # the ImageNet statistics stay: BatchNorm is frozen, so training steps leave them as loaded
    after = trunk.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn_stats.items())
    # the trunk's convolutions did learn
    assert not torch.equal(trunk.conv_stem.weight, classifier.conv_stem.weight)
    out = detect(model, [source.load(0).image], source.thing_classes)[0]
    assert set(out["labels"].tolist()) <= set(source.thing_classes) and out["boxes"].shape[1] == 4

