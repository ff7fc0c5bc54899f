"""UniMatch as released: the mixed-in images are the main batch's images augmented again, pseudo-labelled in eval
mode; the learning rate is set after each step."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hafis.config import load_config
from hafis.frameworks.base import FrameworkContext
from hafis.frameworks.unimatch import UniMatch
from hafis.models import DeepLabV3Plus

C, S = 3, 33
TINY = Path(__file__).parents[2] / "configs" / "tiny" / "unimatch.yaml"


def tiny_model():
    torch.manual_seed(0)
    model = DeepLabV3Plus(C, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
    for m in model.modules():  # running statistics far from a batch's: eval-mode and train-mode passes differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.3, 3.0)
    return model.train()


def hand_batch(n_l=2, n_u=2, seed=1):
    g = torch.Generator().manual_seed(seed)

    def img(n):
        return torch.randn(n, 3, S, S, generator=g)

    def views(n):
        ignore = torch.zeros(n, S, S, dtype=torch.long)
        ignore[:, -3:, :] = 255
        return {"weak": img(n), "strong1": img(n), "strong2": img(n), "ignore": ignore}

    box1 = torch.zeros(n_u, S, S, dtype=torch.bool)
    box1[:, 4:20, 6:25] = True
    box2 = torch.zeros(n_u, S, S, dtype=torch.bool)
    box2[0, 10:30, 0:12] = True
    labelled = {"image": img(n_l), "mask": torch.randint(0, C, (n_l, S, S), generator=g)}
    unlabelled = {**views(n_u), "box1": box1, "box2": box2, "mix": views(n_u)}
    return labelled, unlabelled


def released_loss(model, labelled, unlabelled, thresh):
    """UniMatch's unimatch.py training step, transcribed (in-place CutMix by boolean indexing, .item() normaliser)."""
    img_x, mask_x = labelled["image"], labelled["mask"]
    img_u_w, ignore_mask = unlabelled["weak"], unlabelled["ignore"]
    img_u_s1, img_u_s2 = unlabelled["strong1"].clone(), unlabelled["strong2"].clone()
    cutmix_box1, cutmix_box2 = unlabelled["box1"].long(), unlabelled["box2"].long()
    mix = unlabelled["mix"]
    img_u_w_mix, img_u_s1_mix = mix["weak"], mix["strong1"]
    img_u_s2_mix, ignore_mask_mix = mix["strong2"], mix["ignore"]

    with torch.no_grad():
        model.eval()
        pred_u_w_mix = model(img_u_w_mix).logits.detach()
        conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
        mask_u_w_mix = pred_u_w_mix.argmax(dim=1)
    img_u_s1[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1] = \
        img_u_s1_mix[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1]
    img_u_s2[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1] = \
        img_u_s2_mix[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1]

    model.train()
    num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
    out = model(torch.cat((img_x, img_u_w)), feature_perturbation=True)
    preds, preds_fp = out.logits, out.logits_fp
    pred_x, pred_u_w = preds.split([num_lb, num_ulb])
    pred_u_w_fp = preds_fp[num_lb:]
    pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2))).logits.chunk(2)
    pred_u_w = pred_u_w.detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)

    mixed = []
    for box in (cutmix_box1, cutmix_box2):
        m, c, i = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
        m[box == 1], c[box == 1] = mask_u_w_mix[box == 1], conf_u_w_mix[box == 1]
        i[box == 1] = ignore_mask_mix[box == 1]
        mixed.append((m, c, i))

    criterion_u = nn.CrossEntropyLoss(reduction="none")
    loss_x = F.cross_entropy(pred_x, mask_x, ignore_index=255)
    terms = []
    for pred, (m, c, i) in zip((pred_u_s1, pred_u_s2, pred_u_w_fp), mixed + [(mask_u_w, conf_u_w, ignore_mask)],
                               strict=True):
        loss = criterion_u(pred, m) * ((c >= thresh) & (i != 255))
        terms.append(loss.sum() / (i != 255).sum().item())
    loss_u_s1, loss_u_s2, loss_u_w_fp = terms
    return (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0


@pytest.mark.parametrize("thresh", [0.0, 0.6])
def test_loss_and_gradients_equal_the_released_recipe(thresh):
    model = tiny_model()
    reference = copy.deepcopy(model)
    labelled, unlabelled = hand_batch()
    fw = UniMatch(load_config(None, [f"unimatch.threshold={thresh}"]), model, FrameworkContext(C))
    assert fw.traits.mix_batch == "same_images"
    torch.manual_seed(7)
    loss = fw.train_step(labelled, unlabelled, 0).loss
    torch.manual_seed(7)
    expected = released_loss(reference, labelled, unlabelled, thresh)
    assert torch.equal(loss, expected)
    loss.backward(), expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):  # same BatchNorm statistics afterwards
        assert torch.equal(a, b)


class Recorder(nn.Module):
    """Wraps a segmenter and keeps the inputs of its train-mode passes without feature perturbation."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []
        self.align_corners = model.align_corners

    def forward(self, x, feature_perturbation=False):
        if self.training and not feature_perturbation:
            self.seen.append(x.detach().clone())
        return self.model(x, feature_perturbation)


@pytest.mark.parametrize("mix", ["same_images", "other_images", "in_batch"])
def test_one_image_per_process_mixes_in_the_second_batch(mix):
    labelled, unlabelled = hand_batch(n_l=1, n_u=1)
    model = Recorder(tiny_model())
    fw = UniMatch(load_config(None, [f"unimatch.mix={mix}"]), model, FrameworkContext(C))
    fw.train_step(labelled, unlabelled, 0)
    s1 = model.seen[0][:1]
    box = unlabelled["box1"][0]
    if mix != "in_batch":
        assert torch.equal(s1[0][:, box], unlabelled["mix"]["strong1"][0][:, box])
        assert not torch.equal(s1[0][:, box], unlabelled["strong1"][0][:, box])
    else:  # the documented limit of the in-batch variant: image 0 mixes with itself
        assert torch.equal(s1, unlabelled["strong1"])


def test_second_batch_without_a_mix_batch_names_the_key():
    labelled, unlabelled = hand_batch()
    del unlabelled["mix"]
    fw = UniMatch(load_config(None), tiny_model(), FrameworkContext(C))
    with pytest.raises(ValueError, match="unimatch.mix"):
        fw.train_step(labelled, unlabelled, 0)


def mix_stream(tmp_path, mix, batches=4):
    from hafis.engine.trainer import Trainer

    config = load_config(TINY, [f"output_dir={tmp_path}", "train.unlabelled_batch_size=2", f"unimatch.mix={mix}"])
    unlabelled = Trainer(config)._streams()[1]
    return [next(unlabelled) for _ in range(batches)]


def test_same_images_mixes_each_image_with_another_view_of_itself(tmp_path):
    for batch in mix_stream(tmp_path, "same_images"):
        mix = batch["mix"]
        assert set(mix) >= {"weak", "strong1", "strong2", "ignore"}
        assert torch.equal(mix["index"], batch["index"])  # the released loader iterated twice: same order
        for a, b in zip(mix["weak"], batch["weak"], strict=True):  # each image augmented independently
            assert not torch.equal(a, b)


def test_other_images_mixes_in_a_stream_of_its_own_order(tmp_path):
    batches = mix_stream(tmp_path, "other_images")
    main = torch.cat([b["index"] for b in batches])
    other = torch.cat([b["mix"]["index"] for b in batches])
    assert not torch.equal(main, other)
    assert "mix" not in mix_stream(tmp_path, "in_batch", batches=1)[0]


def rates_used(tmp_path, framework, iterations=5):
    """The learning rate of every parameter group as each optimiser step ran."""
    from hafis.engine.trainer import Trainer

    config = load_config(TINY, [f"output_dir={tmp_path}", f"train.framework={framework}",
                                f"train.iterations={iterations}", f"train.eval_interval={iterations}",
                                "train.tensorboard=false", "optim.head_lr_multiplier=10"])
    trainer = Trainer(config)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append([g["lr"] for g in
                                                                                    opt.param_groups]))
    trainer.train()
    bases = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    return used, bases, config.optim.poly_power


def test_unimatch_uses_the_rate_set_after_the_previous_step_as_released(tmp_path):
    used, bases, power = rates_used(tmp_path, "unimatch")
    assert {round(b, 12) for b in bases} == {0.01, 0.1}
    # the release: SGD starts at the base rates; after step i (i = epoch * len + i) it sets lr(i) for the next step
    total, expected, current = len(used), [], list(bases)
    for i in range(total):
        expected.append(list(current))
        current = [b * (1 - i / total) ** power for b in bases]
    assert expected[0] == expected[1] == bases
    np.testing.assert_allclose(used, expected, rtol=1e-12, atol=0)


def test_a_framework_released_with_the_rate_set_before_the_step_keeps_it(tmp_path):
    used, bases, power = rates_used(tmp_path, "supervised", iterations=4)
    np.testing.assert_allclose(used, [[b * (1 - i / 4) ** power for b in bases] for i in range(4)], rtol=1e-12, atol=0)


def test_strong_bank_view_is_unimatch_only():
    from hafis.config import ConfigError
    from hafis.frameworks import FrameworkContext, build_framework

    overrides = ["weighting.enabled=true", "weighting.bank_view=strong", "train.framework=u2pl"]
    with pytest.raises(ConfigError, match="bank_view"):
        build_framework(load_config(None, overrides), tiny_model(), FrameworkContext(C))
