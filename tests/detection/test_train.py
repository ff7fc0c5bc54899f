import numpy as np
import torch

from hafis.data.base import Sample
from hafis.data.synthetic import SyntheticConfig, SyntheticScenes
from hafis.detection.infer import detect
from hafis.detection.networks import build_detector
from hafis.detection.train import DetectionDataset, sample_boxes, train_detector


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
                                                      plain_target["boxes"].int().tolist(), strict=True):
            assert (y0, y1) == (q0, q1)
            assert torch.equal(image[:, y0:y1, x0:x1], plain_image[:, q0:q1, p0:p1].flip(-1))
    assert 0 < flipped < len(source)


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

