"""AugSeg as released: one training step's loss terms and gradients against an independent transcription of the
released step (ZhenZHAO/AugSeg train_semi.py ``train``, augs_ALIA.py ``cut_mix_label_adaptive``, loss_helper.py
``compute_unsupervised_loss_by_threshold``) on the same weights, batch and draws.

The draws are hafis's (its generator's permutation, box masks and uniforms, recorded as they are made); the
released code draws the same quantities from ``numpy`` / ``torch``. The strong view is an input of both (the
released loader applies the intensity ops; hafis applies them in the framework, tested in test_augseg.py)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hafis.frameworks.augseg as augseg_module
from hafis.config import load_config
from hafis.frameworks.augseg import AugSeg
from hafis.frameworks.base import FrameworkContext

C, S = 3, 33


def batch(n=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, C, (n, S, S), generator=g)
    mask[:, :4] = 255  # ignored ground truth, carried into the mixed images
    return ({"image": torch.randn(n, 3, S, S, generator=g), "mask": mask},
            {"weak": torch.randn(n, 3, S, S, generator=g), "ignore": torch.zeros(n, S, S, dtype=torch.long)},
            torch.randn(n, 3, S, S, generator=g))


def bbox(mask):
    """The released rand_bbox's (x1, y1, x2, y2) of one box mask (x: dim 2, y: dim 3, as it indexes)."""
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if rows.numel() == 0:
        return 0, 0, 0, 0
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def cut_mix_label_adaptive(unlabeled_image, unlabeled_mask, unlabeled_logits, labeled_image, labeled_mask,
                           lst_confidences, u_rand_index, l_boxes, u_boxes, randoms):
    """augs_ALIA.py cut_mix_label_adaptive, transcribed; its draws (randperm, rand_bbox, np.random.random) given."""
    mix_unlabeled_image = unlabeled_image.clone()
    mix_unlabeled_target = unlabeled_mask.clone()
    mix_unlabeled_logits = unlabeled_logits.clone()
    labeled_logits = torch.ones_like(labeled_mask)
    for i in range(mix_unlabeled_image.shape[0]):
        if randoms[i] > lst_confidences[i]:
            x1, y1, x2, y2 = l_boxes[i]
            mix_unlabeled_image[i, :, x1:x2, y1:y2] = labeled_image[u_rand_index[i], :, x1:x2, y1:y2]
            mix_unlabeled_target[i, x1:x2, y1:y2] = labeled_mask[u_rand_index[i], x1:x2, y1:y2]
            mix_unlabeled_logits[i, x1:x2, y1:y2] = labeled_logits[u_rand_index[i], x1:x2, y1:y2]
    for i in range(unlabeled_image.shape[0]):
        x1, y1, x2, y2 = u_boxes[i]
        unlabeled_image[i, :, x1:x2, y1:y2] = mix_unlabeled_image[u_rand_index[i], :, x1:x2, y1:y2]
        unlabeled_mask[i, x1:x2, y1:y2] = mix_unlabeled_target[u_rand_index[i], x1:x2, y1:y2]
        unlabeled_logits[i, x1:x2, y1:y2] = mix_unlabeled_logits[u_rand_index[i], x1:x2, y1:y2]
    return unlabeled_image, unlabeled_mask, unlabeled_logits


def released_step(model, model_teacher, image_l, label_l, image_u_weak, image_u_aug, draws, p_threshold,
                  num_classes):
    """train_semi.py ``train``, the semi-supervised branch (CE criterion, no auxiliary head, no extra weak view)."""
    with torch.no_grad():
        model_teacher.eval()
        pred_u = model_teacher(image_u_weak.detach()).logits
        pred_u = F.softmax(pred_u, dim=1)
        logits_u_aug, label_u_aug = torch.max(pred_u, dim=1)
        entropy = -torch.sum(pred_u * torch.log(pred_u + 1e-10), dim=1)
        entropy /= np.log(num_classes)
        confidence = 1.0 - entropy
        confidence = confidence * logits_u_aug
        confidence = confidence.mean(dim=[1, 2])
        confidence = confidence.cpu().numpy().tolist()
    model.train()
    if draws is not None:
        image_u_aug, label_u_aug, logits_u_aug = cut_mix_label_adaptive(
            image_u_aug.clone(), label_u_aug, logits_u_aug, image_l, label_l, confidence, *draws)
    num_labeled = len(image_l)
    pred_all = model(torch.cat((image_l, image_u_aug), dim=0)).logits
    pred_l = pred_all[:num_labeled]
    pred_u_strong = pred_all[num_labeled:]
    sup_loss = F.cross_entropy(pred_l, label_l, ignore_index=255)
    target = label_u_aug.detach().clone()
    thresh_mask = logits_u_aug.detach().ge(p_threshold).bool() * (target != 255).bool()
    target[~thresh_mask] = 255
    unsup_loss = F.cross_entropy(pred_u_strong, target, ignore_index=255, reduction="none").mean()
    return sup_loss, unsup_loss


@pytest.mark.parametrize("threshold,cutmix", [(0.0, 1.0), (0.4, 1.0), (0.4, 0.0)])
def test_loss_and_gradients_equal_the_released_step(threshold, cutmix, monkeypatch, tiny_deeplab):
    model = tiny_deeplab(C)
    reference = copy.deepcopy(model)
    labelled, unlabelled, strong = batch()
    config = load_config(None, ["train.framework=augseg", f"augseg.threshold={threshold}",
                                f"augseg.cutmix_prob={cutmix}"])
    fw = AugSeg(config, model, FrameworkContext(C))
    teacher = copy.deepcopy(fw.teacher.module)
    monkeypatch.setattr(fw, "strong_view", lambda weak: strong.clone())
    seen = {"rand": []}
    rand = fw.rand
    monkeypatch.setattr(fw, "rand", lambda *shape, **kw: seen["rand"].append(rand(*shape, **kw)) or seen["rand"][-1])
    mix = augseg_module.label_aided_cutmix

    def record(u, lab, take, perm, box_l, box_u):
        seen.update(perm=perm.tolist(), box_l=[bbox(b) for b in box_l], box_u=[bbox(b) for b in box_u])
        return mix(u, lab, take, perm, box_l, box_u)

    monkeypatch.setattr(augseg_module, "label_aided_cutmix", record)
    out = fw.train_step(labelled, unlabelled, 0)
    draws = None
    if cutmix:
        draws = (seen["perm"], seen["box_l"], seen["box_u"], seen["rand"][1].tolist())
        assert any(x2 > x1 for x1, _, x2, _ in seen["box_u"])
    sup, unsup = released_step(reference, teacher, labelled["image"], labelled["mask"], unlabelled["weak"], strong,
                               draws, threshold, C)
    diffs = {"loss_x": (out.terms["loss_x"] - sup).abs().item(), "loss_u": (out.terms["loss_u"] - unsup).abs().item()}
    assert unsup > 0 and max(diffs.values()) <= 1e-6, diffs
    out.loss.backward()
    (sup + unsup).backward()
    grad = max((p.grad - q.grad).abs().max().item()
               for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    assert grad <= 1e-6, grad
    print(f"augseg threshold={threshold} cutmix={cutmix}: |terms - released| {diffs}, |gradients| {grad:.2e}")
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):  # the same BatchNorm statistics afterwards
        assert torch.equal(a, b)
