"""U2PL as released: one training step's supervised and unsupervised terms and their gradients against an independent
transcription of the released step (Haochen-Wang409/U2PL train_semi.py ``train``, augmentation.py
``generate_unsup_data`` in cutmix mode, loss_helper.py ``compute_unsupervised_loss``, ``CriterionOhem`` /
``Criterion`` with the auxiliary head) on the same weights, batch and CutMix box.

Deliberate differences, stated and not transcribed:

* the teacher pass that gives the entropy (and the contrastive representations) runs in eval mode in hafis; the
  released code runs it in train mode (batch statistics, dropout): the transcription takes the mode as an argument
  and is run with hafis's (``frameworks/teacher.py`` says why);
* the contrastive term is the paper's, on every image: the released one-hot helper fills only image 0 and its
  negative mask pairs anchors of class i with ``valid_classes[i]`` (U2PL issue #111); the loss-term comparison runs
  with ``u2pl.contrastive_weight=0`` and hafis's contrastive term is checked by test_u2pl.py's hand computations;
* α_t is stepped per iteration (released: per epoch); at iteration 0 both are 20 %.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hafis.frameworks.u2pl as u2pl_module
from hafis.config import load_config
from hafis.frameworks.base import FrameworkContext
from hafis.frameworks.u2pl import U2PL
from hafis.models.released import ReleasedDeepLabV3Plus

C, S = 3, 33


def ohem_2d_tensor(pred, target, thresh, min_kept, ignore_index=255):
    """loss_helper.py OhemCrossEntropy2dTensor.forward, transcribed."""
    b, c, h, w = pred.size()
    target = target.view(-1)
    valid_mask = target.ne(ignore_index)
    target = target * valid_mask.long()
    num_valid = valid_mask.sum()
    prob = F.softmax(pred, dim=1)
    prob = (prob.transpose(0, 1)).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill_(~valid_mask, 1)
        mask_prob = prob[target, torch.arange(len(target), dtype=torch.long)]
        threshold = thresh
        if min_kept > 0:
            _, index = mask_prob.sort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept_mask = mask_prob.le(threshold)
            target = target * kept_mask.long()
            valid_mask = valid_mask * kept_mask
    target = target.masked_fill_(~valid_mask, ignore_index)
    return F.cross_entropy(pred, target.view(b, h, w), ignore_index=ignore_index)


def criterion(preds, target, aux_weight, ohem_min_kept):
    """Criterion (CE) / CriterionOhem.forward with ``aux_weight`` (0: no auxiliary head)."""
    def one(p):
        if ohem_min_kept is None:
            return F.cross_entropy(p, target, ignore_index=255)
        return ohem_2d_tensor(p, target.clone(), 0.7, ohem_min_kept)

    if aux_weight > 0:
        main_pred, aux_pred = preds
        return one(main_pred) + aux_weight * one(aux_pred)
    return one(preds)


def generate_unsup_data(data, target, logits, box):
    """augmentation.py generate_unsup_data(mode="cutmix"), its generate_cutout_mask given (1 outside the box)."""
    batch_size = data.shape[0]
    new_data, new_target, new_logits = [], [], []
    for i in range(batch_size):
        mix_mask = (~box[i]).long()
        new_data.append((data[i] * mix_mask + data[(i + 1) % batch_size] * (1 - mix_mask)).unsqueeze(0))
        new_target.append((target[i] * mix_mask + target[(i + 1) % batch_size] * (1 - mix_mask)).unsqueeze(0))
        new_logits.append((logits[i] * mix_mask + logits[(i + 1) % batch_size] * (1 - mix_mask)).unsqueeze(0))
    return torch.cat(new_data), torch.cat(new_target).long(), torch.cat(new_logits)


def compute_unsupervised_loss(predict, target, percent, pred_teacher):
    """loss_helper.py compute_unsupervised_loss, transcribed."""
    batch_size, num_class, h, w = predict.shape
    with torch.no_grad():
        prob = torch.softmax(pred_teacher, dim=1)
        entropy = -torch.sum(prob * torch.log(prob + 1e-10), dim=1)
        thresh = np.percentile(entropy[target != 255].detach().cpu().numpy().flatten(), percent)
        thresh_mask = entropy.ge(thresh).bool() * (target != 255).bool()
        target[thresh_mask] = 255
        weight = batch_size * h * w / torch.sum(target != 255)
    return weight * F.cross_entropy(predict, target, ignore_index=255)


def released_step(model, model_teacher, image_l, label_l, image_u, box, teacher_mode, epoch, epochs, aux_weight,
                  ohem_min_kept):
    """train_semi.py ``train`` after the supervised-only epoch (contrastive term left out, see the docstring).

    The networks return their logits at input size, resized from the decoder's output with ``align_corners=True``
    as train_semi.py resizes ``pred``."""
    h, w = label_l.shape[1:]
    model_teacher.eval()
    with torch.no_grad():
        pred_u_teacher = F.softmax(model_teacher(image_u).logits, dim=1)
        logits_u_aug, label_u_aug = torch.max(pred_u_teacher, dim=1)
    if box is not None:
        image_u_aug, label_u_aug, logits_u_aug = generate_unsup_data(image_u, label_u_aug.clone(),
                                                                     logits_u_aug.clone(), box)
    else:
        image_u_aug = image_u
    num_labeled = len(image_l)
    image_all = torch.cat((image_l, image_u_aug))
    outs = model(image_all)
    pred_l_large, pred_u_large = outs.logits[:num_labeled], outs.logits[num_labeled:]
    preds = [pred_l_large, outs.aux[:num_labeled]] if aux_weight > 0 else pred_l_large
    sup_loss = criterion(preds, label_l.clone(), aux_weight, ohem_min_kept)
    model_teacher.train(teacher_mode == "train")
    with torch.no_grad():
        pred_u_large_teacher = model_teacher(image_all).logits[num_labeled:]
    drop_percent = 80
    percent_unreliable = (100 - drop_percent) * (1 - epoch / epochs)
    drop_percent = 100 - percent_unreliable
    unsup_loss = compute_unsupervised_loss(pred_u_large, label_u_aug.clone(), drop_percent,
                                           pred_u_large_teacher.detach())
    return sup_loss, unsup_loss


def network(kind):
    torch.manual_seed(0)
    if kind == "unimatch":
        from hafis.models import DeepLabV3Plus

        model = DeepLabV3Plus(C, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
    else:  # the released decoder with its representation and auxiliary heads (U2PL's Cityscapes network)
        model = ReleasedDeepLabV3Plus(C, backbone="resnet_tiny", output_stride=8, aux_head=True, representation=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.3, 3.0)
    return model.train()


def batch(n=2, seed=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, C, (n, S, S), generator=g)
    mask[:, :3] = 255
    return ({"image": torch.randn(n, 3, S, S, generator=g), "mask": mask},
            {"weak": torch.randn(n, 3, S, S, generator=g), "ignore": torch.zeros(n, S, S, dtype=torch.long)})


@pytest.mark.parametrize("kind,cutmix,ohem", [("unimatch", 1.0, False), ("unimatch", 0.0, False),
                                              ("released", 1.0, True)])
def test_supervised_and_unsupervised_terms_equal_the_released_step(kind, cutmix, ohem, monkeypatch):
    model = network(kind)
    reference = copy.deepcopy(model)
    labelled, unlabelled = batch()
    aux = 0.4 if kind == "released" else 0.0
    overrides = ["train.framework=u2pl", "u2pl.sup_only_iterations=0", "u2pl.contrastive_weight=0",
                 f"u2pl.cutmix_prob={cutmix}", f"model.aux_weight={aux}", "train.iterations=100"]
    if ohem:
        overrides += ["loss.labelled=ohem", "loss.ohem_min_kept=500"]
    if kind == "unimatch":
        overrides.append("model.feature_dim=16")
    fw = U2PL(load_config(None, overrides), model, FrameworkContext(C))
    teacher = copy.deepcopy(fw.teacher.module.segmenter)
    seen = {}
    boxes = u2pl_module.half_area_boxes

    def record(*args):
        seen["box"] = boxes(*args)
        return seen["box"]

    monkeypatch.setattr(u2pl_module, "half_area_boxes", record)
    torch.manual_seed(7)  # the same dropout draws (the released decoder's) in the student's pass
    out = fw.train_step(labelled, unlabelled, 0)
    assert ("box" in seen) == bool(cutmix)
    torch.manual_seed(7)
    sup, unsup = released_step(reference, teacher, labelled["image"], labelled["mask"], unlabelled["weak"],
                               seen.get("box"), "eval", 0, 80, aux, 500 * 2 if ohem else None)
    diffs = {"loss_x": (out.terms["loss_x"] - sup).abs().item(), "loss_u": (out.terms["loss_u"] - unsup).abs().item()}
    assert unsup > 0 and max(diffs.values()) <= 1e-6, diffs
    out.loss.backward()
    (sup + unsup).backward()
    grads = {n: (p.grad - q.grad).abs().max().item()
             for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True) if q.grad is not None}
    assert max(grads.values()) <= 1e-6, max(grads.items(), key=lambda kv: kv[1])
    print(f"u2pl {kind} cutmix={cutmix} ohem={ohem}: |terms - released| {diffs}, |gradients| {max(grads.values()):.2e}")
    if kind == "released":  # the auxiliary head took part, the representation head not (contrastive weight 0)
        assert model.auxor.aux[0].weight.grad.abs().sum() > 0


def test_released_network_feeds_the_contrastive_term_from_its_own_representation_head():
    model = network("released")
    fw = U2PL(load_config(None, ["train.framework=u2pl", "u2pl.sup_only_iterations=0", "model.aux_weight=0.4",
                                 "u2pl.queue_size=64"]), model, FrameworkContext(C))
    assert fw.rep_head is None and fw.param_groups(0.1, 10, 0) == []
    labelled, unlabelled = batch()
    out = fw.train_step(labelled, unlabelled, 0)
    out.loss.backward()
    assert torch.isfinite(out.terms["loss_contra"])
    # the released head sits on the decoder's 512-channel concatenation and trains with the segmenter
    assert model.decoder.representation[0].weight.shape[1] == 512
    assert model.decoder.representation[0].weight.grad is not None


def test_contrastive_term_reads_every_image(stub_segmenter, stub_config, monkeypatch):
    """hafis's side of the first difference: labelled image 1's class counts. The released one-hot helper fills
    image 0 only, so with class 0 in image 0 and class 1 in image 1 it sees one class and returns 0."""
    fw = U2PL(stub_config("train.framework=u2pl", "u2pl.num_anchors=2", "u2pl.num_negatives=2", "u2pl.low_rank=2",
                          "u2pl.high_rank=2", "u2pl.rep_dim=4"), stub_segmenter(2), FrameworkContext(2))
    terms = []
    term = u2pl_module.contrastive_term
    monkeypatch.setattr(u2pl_module, "contrastive_term", lambda *a: terms.append(a[1]) or term(*a))
    g = torch.Generator().manual_seed(0)
    rep, rep_t = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    logits = torch.tensor([2.0, -2.0]).view(1, 2, 1, 1).expand(3, 2, 2, 2).clone()
    logits[1] = -logits[1]  # confident class 1 on image 1, class 0 elsewhere: both rank the other class second
    labels = torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]).long()
    off = torch.zeros(1, 2, 2, dtype=torch.bool)
    loss = fw.contrastive_loss(rep, rep_t, logits, labels, torch.zeros(1, 2, 2, dtype=torch.long), off, off)
    assert len(terms) == 2 and loss > 0  # both classes, each with the other image's pixels as negatives
    assert torch.allclose(terms[1], rep_t[1].mean(dim=(1, 2)))  # class 1's prototype: image 1's teacher features
