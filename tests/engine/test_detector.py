import numpy as np
import pytest
import torch

from hafis.data.base import Sample
from hafis.data.synthetic import SyntheticConfig, SyntheticScenes
from hafis.data.io import boxes_from_connected_components, boxes_from_instance_mask
from hafis.engine.detector import DetectionDataset, detect, sample_boxes, train_detector
from hafis.models.detector import build_detector


def test_boxes_from_instance_mask_are_exact():
    inst = np.zeros((8, 10), np.int64)
    inst[1:3, 2:5] = 7                      # a rectangle: box (2, 1, 5, 3)
    inst[4, 1:6] = 26001                    # an L shape with a Cityscapes-style id: box (1, 4, 6, 7)
    inst[5:7, 1] = 26001
    inst[6, 8] = 255                        # VOC object border: no instance
    inst[0, 9] = 3                          # a one-pixel instance, all of it ignore in the semantic mask
    sem = np.zeros((8, 10), np.uint8)
    sem[inst == 7] = 2
    sem[inst == 26001] = 4
    sem[4, 5] = 3                           # one stray pixel of another class: the majority class wins
    sem[1:3, 4] = 255                       # ignore pixels do not count: the rectangle loses its last column
    sem[0, 9] = 255
    boxes, labels = boxes_from_instance_mask(inst, sem)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    assert boxes.tolist() == [[2, 1, 4, 3], [1, 4, 6, 7]]   # increasing id: 7, then 26001; id 3 had no pixel
    assert labels.tolist() == [2, 4]
    # without the semantic mask: every instance pixel counts and the label is the instance id
    boxes, labels = boxes_from_instance_mask(inst)
    assert boxes.tolist() == [[9, 0, 10, 1], [2, 1, 5, 3], [1, 4, 6, 7]]
    assert labels.tolist() == [3, 7, 26001]
    boxes, labels = boxes_from_instance_mask(inst, min_area=2)  # the one-pixel instance goes
    assert labels.tolist() == [7, 26001]
    empty = boxes_from_instance_mask(np.zeros((4, 4), np.int64))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_boxes_from_connected_components_are_exact():
    sem = np.zeros((6, 8), np.uint8)
    sem[0:2, 0:2] = 1            # component A of class 1
    sem[2, 2] = 1                # touches A only diagonally
    sem[4:6, 5:8] = 1            # component B of class 1
    sem[0:3, 6] = 2              # a thin class-2 stroke
    sem[5, 0] = 3                # class 3 is not asked for
    boxes, labels = boxes_from_connected_components(sem, [1, 2])
    assert boxes.tolist() == [[0, 0, 3, 3], [5, 4, 8, 6], [6, 0, 7, 3]]  # 8-connectivity joins the diagonal pixel
    assert labels.tolist() == [1, 1, 2]
    boxes, labels = boxes_from_connected_components(sem, [1, 2], connectivity=4)
    assert boxes.tolist() == [[0, 0, 2, 2], [2, 2, 3, 3], [5, 4, 8, 6], [6, 0, 7, 3]]
    boxes, labels = boxes_from_connected_components(sem, [1, 2], min_area=4)  # the 3-pixel stroke goes
    assert boxes.tolist() == [[0, 0, 3, 3], [5, 4, 8, 6]] and labels.tolist() == [1, 1]


def test_sample_boxes_prefers_instances_and_keeps_thing_classes_only():
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:4] = 1
    mask[4:6, 4:6] = 2  # class 2 is stuff here
    with_instances = Sample(np.zeros((6, 6, 3), np.uint8), mask, "a",
                            boxes=np.array([[0, 0, 5, 5], [4, 4, 6, 6]], np.float32), box_labels=np.array([1, 2]))
    boxes, labels = sample_boxes(with_instances, thing_classes=[1])
    assert boxes.tolist() == [[0, 0, 5, 5]] and labels.tolist() == [1]
    boxes, labels = sample_boxes(with_instances, thing_classes=[1], mode="components")
    assert boxes.tolist() == [[1, 1, 4, 3]] and labels.tolist() == [1]
    without = Sample(np.zeros((6, 6, 3), np.uint8), mask, "b")
    boxes, labels = sample_boxes(without, thing_classes=[1, 2])
    assert boxes.tolist() == [[1, 1, 4, 3], [4, 4, 6, 6]] and labels.tolist() == [1, 2]


def test_detection_dataset_flips_boxes_with_the_image():
    source = SyntheticScenes(SyntheticConfig(image_size=32, num_labelled=6, num_unlabelled=1, num_val=1,
                                             num_object_classes=3), "labelled", cache_dir=False)
    ds = DetectionDataset(source, source.thing_classes, seed=0)
    ds_plain = DetectionDataset(source, source.thing_classes, seed=0, flip=False)
    flipped = 0
    for index in range(len(source)):
        image, target = ds[(0, index)]
        plain_image, plain_target = ds_plain[(0, index)]
        assert torch.equal(target["labels"], plain_target["labels"])
        assert target["labels"].min() >= 1 and target["labels"].max() <= 3  # torchvision ids 1..T
        if torch.equal(image, plain_image):
            assert torch.equal(target["boxes"], plain_target["boxes"])
            continue
        flipped += 1
        assert torch.equal(image, plain_image.flip(-1))
        for (x0, y0, x1, y1), (p0, q0, p1, q1) in zip(target["boxes"].int().tolist(),
                                                      plain_target["boxes"].int().tolist()):
            assert (y0, y1) == (q0, q1)
            assert torch.equal(image[:, y0:y1, x0:x1], plain_image[:, q0:q1, p0:p1].flip(-1))
    assert 0 < flipped < len(source)


class _FixedDetector(torch.nn.Module):
    def forward(self, images):
        return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.5, 0.5, 3.0, 3.0]]),
                 "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.99, 0.4])} for _ in images]


def test_detect_maps_detector_labels_to_segmentation_classes():
    out = detect(_FixedDetector(), [np.zeros((8, 8, 3), np.uint8)] * 2, thing_classes=[3, 5])
    assert len(out) == 2
    assert out[0]["labels"].tolist() == [5, 3]
    assert out[0]["boxes"].tolist() == [[1, 2, 5, 6], [0.5, 0.5, 3, 3]]
    assert out[0]["scores"].dtype == np.float32


def test_tiny_detector_loss_falls():
    source = SyntheticScenes(SyntheticConfig(image_size=48, num_labelled=8, num_unlabelled=1, num_val=1,
                                             num_object_classes=2, max_objects=3), "labelled", cache_dir=False)
    torch.manual_seed(0)
    model = build_detector("tiny", 2, min_size=48, max_size=48)
    losses = train_detector(model, DetectionDataset(source, source.thing_classes, seed=0), 40, batch_size=4,
                            lr=2e-3, seed=0)
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8]), losses  # about 0.63 on this seed
    assert not model.training
    out = detect(model, [source.load(0).image], source.thing_classes)[0]
    assert set(out["labels"].tolist()) <= {1, 2} and out["boxes"].shape[1] == 4


def test_build_detector_archs_without_downloads():
    model = build_detector("resnet50_fpn", 3, min_size=64, max_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(ValueError, match="unknown detector arch"):
        build_detector("yolo", 3)
    with pytest.raises(ValueError, match="at least one thing class"):
        build_detector("tiny", 0)


def test_combined_boxes_add_large_thin_class_components_to_the_instance_boxes():
    # Cityscapes trainIds: 5 pole, 7 traffic sign (no instances), 13 car (instances)
    mask = np.zeros((20, 20), np.uint8)
    mask[0:15, 2:8] = 5    # a pole of 90 px: kept
    mask[0:10, 12:20] = 7  # a sign of 80 px: below 90, dropped
    mask[16:20, 10:20] = 13
    sample = Sample(np.zeros((20, 20, 3), np.uint8), mask, "c",
                    boxes=np.array([[10, 16, 20, 20]], np.float32), box_labels=np.array([13]))
    things = [5, 7, 13]
    boxes, labels = sample_boxes(sample, things, mode="combined", min_area=90, component_classes=[5, 7])
    assert boxes.tolist() == [[10, 16, 20, 20], [2, 0, 8, 15]] and labels.tolist() == [13, 5]
    # the other modes take one source or the other, never both
    assert sample_boxes(sample, things, mode="instances")[1].tolist() == [13]
    assert sample_boxes(sample, things, mode="auto", min_area=90)[1].tolist() == [13]


def test_combined_mode_resolves_the_component_classes_by_name():
    from hafis.config import ConfigError, load_config
    from hafis.data.cityscapes import CLASS_NAMES, THING_CLASSES
    from hafis.engine.detect import component_classes, detected_classes

    class Source:
        class_names, thing_classes = CLASS_NAMES, THING_CLASSES

    config = load_config(None, ["data.dataset=cityscapes", "detector.boxes=combined"])
    assert component_classes(config, Source) == [5, 6, 7]
    assert detected_classes(config, Source) == [5, 6, 7, *THING_CLASSES]
    assert detected_classes(load_config(None, ["data.dataset=cityscapes"]), Source) == list(THING_CLASSES)
    bad = load_config(None, ["detector.boxes=combined", "detector.component_classes=[pole, lamp]"])
    with pytest.raises(ConfigError, match="detector.component_classes.*'lamp'"):
        component_classes(bad, Source)


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
