"""AEL as released: one training step's loss terms and gradients against an independent transcription of the released
step (hzhupku/SemiSeg-AEL train.py ``train`` with ``acp`` / ``acm`` / ``sample``, loss_helper.py ``CriterionOhem``
with the auxiliary head and ``Criterion_cons``) on the same weights, batch and draws.

Deliberate differences, stated and not transcribed:

* the class-guided CutMix partner comes from the batch (released: an image loaded from a dataset-wide bank) and
  Adaptive Copy-Paste pastes from the next labelled image of the batch (released: a separately loaded image
  rescaled by 0.1-2.0): the test takes hafis's pasted labelled batch and its boxes and partners as the draws;
* the teacher runs in eval mode (released: train mode): the transcription takes the mode as an argument and is run
  with hafis's;
* equalization sampling draws one uniform per pixel (released: one ``(h, w)`` map per class, shared by the images of
  a GPU): the comparison runs where the sampling is certain (a uniform confidence bank that does not move,
  ``ael.momentum=1``: every rate is 1), which leaves both sides deterministic;
* the released losses are divided by the world size (8) before DDP averages: the paper configs divide the learning
  rate instead (test_paper_configs.py); here one process, world size 1.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hafis.config import load_config
from hafis.frameworks.ael import AEL
from hafis.frameworks.base import FrameworkContext
from hafis.models.released import ReleasedDeepLabV3Plus

sys.path.insert(0, str(Path(__file__).parent))
from test_u2pl_released import criterion  # noqa: E402  (the released OHEM / auxiliary criterion, the same code)

C, S = 3, 33


def criterion_cons(preds, conf, gt, dcp_criterion, gamma, gamma2=1.0, sample=True):
    """loss_helper.py Criterion_cons.forward, transcribed (``torch.rand(h, w)`` per class, on CPU)."""
    ce_loss = F.cross_entropy(preds, gt, ignore_index=255, reduction="none")
    conf = torch.pow(conf, gamma)
    if sample:
        dcp_criterion = 1 - dcp_criterion
        dcp_criterion = dcp_criterion / (torch.max(dcp_criterion) + 1e-12)
        dcp_criterion = torch.pow(dcp_criterion, gamma2)
        pred_map = preds.max(1)[1].float()
        sample_map = torch.zeros_like(pred_map).float()
        h, w = pred_map.shape[-2], pred_map.shape[-1]
        for idx in range(len(dcp_criterion)):
            prob = 1 - dcp_criterion[idx]
            rand_map = torch.rand(h, w) * (pred_map == idx)
            rand_map = (rand_map > prob) * 1.0
            sample_map += rand_map
        conf = conf * sample_map
    conf = conf / (conf.sum() + 1e-12)
    return (conf * ce_loss).sum()


def released_step(model, model_teacher, images_sup, labels_sup, images_unsup, mix_mask, source, class_criterion,
                  threshold, gamma, aux_weight, ohem_min_kept, teacher_mode):
    """train.py ``train`` from the student's labelled pass on (``acp``, ``acm``, ``sample``), per image of the
    unlabelled batch: image i mixed with image ``source[i]`` inside ``mix_mask[i]`` (released: a batch of two, the
    image and its sampled partner)."""
    preds_student_sup = model(images_sup)
    loss_sup_student = criterion([preds_student_sup.logits, preds_student_sup.aux], labels_sup, aux_weight,
                                 ohem_min_kept)
    with torch.no_grad():
        model_teacher.train(teacher_mode == "train")
        preds_teacher_sup = model_teacher(images_sup).logits.detach()
        preds_teacher_unsup = model_teacher(images_unsup).logits.detach()
        m = mix_mask[:, None].float()
        images_unsup_strong = images_unsup * (1 - m) + images_unsup[source] * m
        preds_teacher_unsup = preds_teacher_unsup * (1 - m) + preds_teacher_unsup[source] * m
        logits_teacher_sup = preds_teacher_sup.max(1)[1]
        conf_sup = F.softmax(preds_teacher_sup, dim=1).max(1)[0]
        logits_teacher_sup[conf_sup < threshold] = 255
        conf_unsup = F.softmax(preds_teacher_unsup, dim=1).max(1)[0]
        logits_teacher_unsup = preds_teacher_unsup.max(1)[1]
        logits_teacher_unsup[conf_unsup < threshold] = 255
    preds_student_unsup = model(images_unsup_strong)
    loss_consistency1 = criterion_cons(preds_student_sup.logits, conf_sup, logits_teacher_sup, class_criterion, gamma)
    loss_consistency2 = criterion_cons(preds_student_unsup.logits, conf_unsup, logits_teacher_unsup, class_criterion,
                                       gamma)
    return loss_sup_student, loss_consistency1, loss_consistency2


def network():
    torch.manual_seed(0)
    model = ReleasedDeepLabV3Plus(C, backbone="resnet_tiny", output_stride=8, aux_head=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.3, 3.0)
    return model.train()


@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_loss_terms_and_gradients_equal_the_released_step(threshold, monkeypatch):
    model = network()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(8)
    mask = torch.randint(0, C, (2, S, S), generator=g)
    mask[:, -4:] = 255
    labelled = {"image": torch.randn(2, 3, S, S, generator=g), "mask": mask}
    unlabelled = {"weak": torch.randn(2, 3, S, S, generator=g), "ignore": torch.zeros(2, S, S, dtype=torch.long)}
    config = load_config(None, ["train.framework=ael", f"ael.threshold={threshold}", "ael.confidence_init=0.5",
                                "ael.momentum=1.0", "model.decoder=released", "model.aux_weight=0.4",
                                "loss.labelled=ohem", "loss.ohem_min_kept=300", "ael.area_thresh=0.01"])
    fw = AEL(config, model, FrameworkContext(C))
    teacher = copy.deepcopy(fw.teacher.module)
    seen = {}
    paste, boxes = fw.copy_paste, fw.cutmix_boxes

    def record_paste(x, y):
        seen["x"], seen["y"] = paste(x, y)
        return seen["x"], seen["y"]

    def record_boxes(pred):
        seen["box"], seen["source"] = boxes(pred)
        return seen["box"], seen["source"]

    monkeypatch.setattr(fw, "copy_paste", record_paste)
    monkeypatch.setattr(fw, "cutmix_boxes", record_boxes)
    torch.manual_seed(9)  # the same dropout draws in the student's two passes
    out = fw.train_step(labelled, unlabelled, 0)
    assert seen["box"].any()
    torch.manual_seed(9)
    sup, cons_l, cons_u = released_step(reference, teacher, seen["x"], seen["y"], unlabelled["weak"], seen["box"],
                                        seen["source"], fw.confidence, threshold, 2.0, 0.4, 300 * 2, "eval")
    got = {"loss_x": sup, "loss_cons_l": cons_l, "loss_cons_u": cons_u}
    diffs = {k: (out.terms[k] - v).abs().item() for k, v in got.items()}
    assert cons_u > 0 and max(diffs.values()) <= 1e-6, diffs
    out.loss.backward()
    (sup + cons_l + cons_u).backward()
    grad = max((p.grad - q.grad).abs().max().item()
               for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    assert grad <= 1e-6, grad
    print(f"ael threshold={threshold}: |terms - released| {diffs}, |gradients| {grad:.2e}")
