"""Boxes from masks (:mod:`hafis.data.io`): exact on hand-drawn masks."""

import numpy as np

from hafis.data.io import boxes_from_connected_components, boxes_from_instance_mask


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

