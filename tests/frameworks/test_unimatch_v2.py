"""UniMatch V2: one step against a transcription of the released step, complementary dropout, W from the teacher,
both networks evaluated, exact resume of the EMA teacher."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hafis.cli import main
from hafis.config import ConfigError, load_config
from hafis.engine.run_log import read_metrics
from hafis.frameworks import FrameworkContext, build_framework
from hafis.frameworks.unimatch_v2 import UniMatchV2, complementary_dropout_mask
from hafis.models.dpt import DPT

C, S = 3, 28
TINY = Path(__file__).parents[2] / "configs" / "tiny" / "unimatch_v2.yaml"
BASE = ["model.name=dpt", "model.backbone=dinov2_tiny", "model.feature_dim=16", f"data.crop_size={S}",
        "train.framework=unimatch_v2", "weighting.reliable=confidence"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return DPT(C, backbone="dinov2_tiny", feature_dim=16).train()


def hand_batch(n_l=2, n_u=4, seed=1):
    g = torch.Generator().manual_seed(seed)

    def img(n):
        return torch.randn(n, 3, S, S, generator=g)

    ignore = torch.zeros(n_u, S, S, dtype=torch.long)
    ignore[:, -3:, :] = 255
    ignore[0, :, :2] = 255
    box1 = torch.zeros(n_u, S, S, dtype=torch.bool)
    box1[:, 4:20, 6:25] = True
    box2 = torch.zeros(n_u, S, S, dtype=torch.bool)
    box2[1, 10:27, 0:12] = True
    box2[3, 0:9, 3:28] = True
    labelled = {"image": img(n_l), "mask": torch.randint(0, C, (n_l, S, S), generator=g)}
    unlabelled = {"weak": img(n_u), "strong1": img(n_u), "strong2": img(n_u), "ignore": ignore, "box1": box1,
                  "box2": box2}
    return labelled, unlabelled


def framework(overrides=(), model=None, teacher_noise=0.05):
    """A framework whose EMA teacher differs from the student (as after some steps), so that using the student
    where the teacher belongs changes the numbers."""
    fw = build_framework(load_config(None, BASE + list(overrides)), model or tiny_model(), FrameworkContext(C))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fw.teacher.module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * teacher_noise)
    return fw


def released_step(model, model_ema, labelled, unlabelled, thresh, generator):
    """UniMatch V2's unimatch_v2.py step and DPT.forward(comp_drop=True), transcribed (the dropout draws from
    ``generator`` in the release's order: the Bernoulli mask, then the kept pairs)."""
    img_x, mask_x = labelled["image"], labelled["mask"]
    img_u_w, ignore_mask = unlabelled["weak"], unlabelled["ignore"]
    img_u_s1, img_u_s2 = unlabelled["strong1"].clone(), unlabelled["strong2"].clone()
    cutmix_box1, cutmix_box2 = unlabelled["box1"].long(), unlabelled["box2"].long()

    with torch.no_grad():
        model_ema.eval()
        pred_u_w = model_ema(img_u_w).logits.detach()
        conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
        mask_u_w = pred_u_w.argmax(dim=1)
    e1 = cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1
    img_u_s1[e1] = img_u_s1.flip(0)[e1]
    e2 = cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1
    img_u_s2[e2] = img_u_s2.flip(0)[e2]

    def dpt(x, comp_drop=False):
        ph, pw = x.shape[-2] // 14, x.shape[-1] // 14
        features = model.backbone(x)  # the four (B, D, h, w) maps: the tokens of get_intermediate_layers
        if comp_drop:
            bs, dim = features[0].shape[0], features[0].shape[1]
            dropout_mask1 = torch.bernoulli(torch.full((bs // 2, dim), 0.5), generator=generator) * 2.0
            dropout_mask2 = 2.0 - dropout_mask1
            num_kept = int(bs // 2 * (1 - 0.5))
            kept_indexes = torch.randperm(bs // 2, generator=generator)[:num_kept]
            dropout_mask1[kept_indexes, :] = 1.0
            dropout_mask2[kept_indexes, :] = 1.0
            dropout_mask = torch.cat((dropout_mask1, dropout_mask2))
            features = [f * dropout_mask[:, :, None, None] for f in features]
        out, _ = model.head(features)
        return F.interpolate(out, (ph * 14, pw * 14), mode="bilinear", align_corners=True)

    pred_x = dpt(img_x)
    pred_u_s1, pred_u_s2 = dpt(torch.cat((img_u_s1, img_u_s2)), comp_drop=True).chunk(2)

    mixed = []
    for box in (cutmix_box1, cutmix_box2):
        m, c, i = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
        m[box == 1] = mask_u_w.flip(0)[box == 1]
        c[box == 1] = conf_u_w.flip(0)[box == 1]
        i[box == 1] = ignore_mask.flip(0)[box == 1]
        mixed.append((m, c, i))

    criterion_u = nn.CrossEntropyLoss(reduction="none")
    loss_x = nn.CrossEntropyLoss(ignore_index=255)(pred_x, mask_x)
    terms = []
    for pred, (m, c, i) in zip((pred_u_s1, pred_u_s2), mixed, strict=True):
        loss = criterion_u(pred, m) * ((c >= thresh) & (i != 255))
        terms.append(loss.sum() / (i != 255).sum().item())
    loss_u_s = (terms[0] + terms[1]) / 2.0
    return (loss_x + loss_u_s) / 2.0


def released_ema(model, model_ema, iters):
    ema_ratio = min(1 - 1 / (iters + 1), 0.996)
    with torch.no_grad():
        for param, param_ema in zip(model.parameters(), model_ema.parameters(), strict=True):
            param_ema.copy_(param_ema * ema_ratio + param.detach() * (1 - ema_ratio))
        for buffer, buffer_ema in zip(model.buffers(), model_ema.buffers(), strict=True):
            buffer_ema.copy_(buffer_ema * ema_ratio + buffer.detach() * (1 - ema_ratio))


def adamw(model):
    return torch.optim.AdamW(model.param_groups(5e-4, 40.0, 0.01), betas=(0.9, 0.999))


@pytest.mark.parametrize("thresh", [0.0, 0.4])
def test_step_equals_the_released_step(thresh):
    fw = framework([f"unimatch_v2.threshold={thresh}"])
    model, reference = fw.model, copy.deepcopy(fw.model)
    reference_ema = copy.deepcopy(fw.teacher.module)
    labelled, unlabelled = hand_batch()
    generator = torch.Generator()
    generator.set_state(fw.generator.get_state())
    iteration = 5
    loss = fw.train_step(labelled, unlabelled, iteration).loss
    expected = released_step(reference, reference_ema, labelled, unlabelled, thresh, generator)
    assert torch.equal(generator.get_state(), fw.generator.get_state())  # the same number of draws
    assert float(expected.detach()) > 0 and (loss - expected).abs().item() == 0.0
    optimizers = adamw(model), adamw(reference)
    loss.backward(), expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every parameter learns from this step
        assert (p.grad - q.grad).abs().max().item() == 0.0, name
    for opt in optimizers:
        opt.step()
    before = [t.clone() for t in reference_ema.state_dict().values()]
    fw.after_optimizer_step(iteration)
    released_ema(reference, reference_ema, iteration)
    # θ·r + θ_s·(1 − r) as released vs in place (mul_, add_ with alpha): equal up to float32 rounding of the terms
    r = 1 - 1 / 6
    for (name, a), b, t, s in zip(fw.teacher.module.state_dict().items(), reference_ema.state_dict().values(), before,
                                  model.state_dict().values(), strict=True):
        bound = 2 * torch.finfo(a.dtype).eps * (t.abs() * r + s.abs() * (1 - r))
        assert ((a - b).abs() <= bound).all(), name
        assert not torch.equal(a, t), name  # the teacher moved


def test_complementary_dropout_masks():
    g = torch.Generator().manual_seed(0)
    mask = complementary_dropout_mask(8, 64, g)
    first, second = mask[:8], mask[8:]
    kept = (first == 1).all(dim=1)
    assert int(kept.sum()) == 4 and torch.equal(kept, (second == 1).all(dim=1))  # half the pairs keep all
    assert torch.equal(first[~kept] + second[~kept], torch.full((4, 64), 2.0))  # complementary on every channel
    assert set(first[~kept].unique().tolist()) == {0.0, 2.0}
    assert 0.35 < float((first[~kept] == 0).float().mean()) < 0.65
    one = complementary_dropout_mask(1, 16, g)  # one pair: int(0.5) = 0 pairs kept, as released
    assert torch.equal(one.sum(dim=0), torch.full((16,), 2.0)) and not (one == 1).all()


def test_the_student_sees_the_mask_on_the_strong_views_only():
    fw = framework()
    calls = []
    forward = fw.model.forward

    def spy(x, feature_perturbation=False, feature_mask=None):
        calls.append((x.shape[0], None if feature_mask is None else feature_mask.clone()))
        return forward(x, feature_perturbation, feature_mask)

    fw.model.forward = spy
    labelled, unlabelled = hand_batch()
    fw.train_step(labelled, unlabelled, 0)
    assert [n for n, _ in calls] == [2, 8] and calls[0][1] is None
    mask = calls[1][1]
    assert mask.shape == (8, 32) and torch.equal(mask[:4] + mask[4:], torch.full((4, 32), 2.0))
    off = framework(["unimatch_v2.complementary_dropout=false"])
    off.model.forward = lambda x, feature_perturbation=False, feature_mask=None: calls.append(feature_mask) or \
        forward(x, feature_perturbation, feature_mask)
    off.train_step(labelled, unlabelled, 0)
    assert calls[-1] is None


def test_weights_come_from_the_teacher_and_follow_cutmix():
    fw = framework(["weighting.enabled=true", "weighting.offset=1", "weighting.labelled_threshold=0.0",
                    "weighting.tau_seg=0.0", "weighting.k=3"], teacher_noise=0.3)
    weighter = fw.weighting.weighter
    g = torch.Generator().manual_seed(5)
    every = torch.arange(C).repeat_interleave(4)[None, None]  # a prototype for every class
    weighter.update_labelled(torch.relu(torch.randn(1, 16, 1, 4 * C, generator=g)), every)
    labelled, unlabelled = hand_batch()
    with torch.no_grad():
        teacher = fw.teacher(unlabelled["weak"])
        student = fw.model.eval()(unlabelled["weak"])
        fw.model.train()
    assert not torch.allclose(teacher.features, student.features)
    seen, losses = [], []
    weights, loss = fw.weighting.weights, fw.weighting.loss
    fw.weighting.weights = lambda f, p, c=None: seen.append((f.clone(), p.clone())) or weights(f, p, c)
    fw.weighting.loss = lambda logits, t, w, *a: losses.append(w) or loss(logits, t, w, *a)
    # the bank must not change between computing the expected W and the step's: fill it, then freeze it
    fw.weighting.update = lambda *a, **k: None
    fw.train_step(labelled, unlabelled, 0)
    features, pseudo = seen[0]
    assert torch.equal(features, teacher.features) and torch.equal(pseudo, teacher.logits.argmax(dim=1))
    w = weights(teacher.features, teacher.logits.argmax(dim=1))
    assert w.std() > 0
    for used, box in zip(losses, (unlabelled["box1"], unlabelled["box2"]), strict=True):
        assert torch.equal(used, torch.where(box, w.flip(0), w))


def test_complementary_dropout_needs_the_dpt_segmenter():
    from hafis.models import DeepLabV3Plus

    torch.manual_seed(0)
    model = DeepLabV3Plus(C, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
    with pytest.raises(ValueError, match="complementary_dropout"):
        UniMatchV2(load_config(None, ["train.framework=unimatch_v2"]), model, FrameworkContext(C))
    with pytest.raises(ConfigError, match="threshold"):
        load_config(None, ["unimatch_v2.threshold=2"])


def train(run_dir, *overrides):
    assert main(["train", str(TINY), f"output_dir={run_dir}", "train.tensorboard=false", *overrides]) == 0
    return read_metrics(run_dir / "metrics.jsonl")


def test_tiny_run_evaluates_student_and_teacher_and_resumes_the_teacher_bit_for_bit(tmp_path):
    extra = ["train.iterations=4", "train.eval_interval=2", "weighting.enabled=true"]
    full = train(tmp_path / "full", *extra)
    evals = [r for r in full if r.get("event") == "eval"]
    assert len(evals) == 2
    for r in evals:
        assert r["miou_teacher"] == r["miou"] and 0 <= r["miou_student"] <= 1
        assert r["best_network"] == ("student" if r["miou_student"] > r["miou"] else "teacher")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    (resumed_dir / "checkpoints" / "ckpt_00000004.pt").unlink()
    assert main(["train", str(TINY), f"output_dir={resumed_dir}", "train.tensorboard=false", *extra,
                 "--resume"]) == 0
    a, b = (torch.load(d / "checkpoints" / "ckpt_00000004.pt", map_location="cpu", weights_only=False)
            for d in (tmp_path / "full", resumed_dir))
    assert a["framework"]["ema_updates"] == 4
    for key, value in a["framework"]["teacher"].items():
        assert torch.equal(value, b["framework"]["teacher"][key]), key
    for key, value in a["student"].items():
        assert torch.equal(value, b["student"][key]), key
    assert torch.equal(a["framework"]["generator"], b["framework"]["generator"])


def test_paper_configs_hold_the_released_recipe():
    configs = Path(__file__).parents[2] / "configs"
    c = load_config(configs / "voc/classic/1464/unimatch_v2.yaml")
    assert (c.model.name, c.model.backbone, c.model.feature_dim, c.model.pretrained) == \
        ("dpt", "dinov2_small", 64, "dinov2")
    assert (c.data.crop_size, c.train.batch_size, c.train.unlabelled_batch_size) == (518, 16, 16)
    assert (c.optim.name, c.optim.lr, c.optim.head_lr_multiplier, c.optim.weight_decay, c.optim.betas) == \
        ("adamw", 5e-6, 40.0, 0.01, (0.9, 0.999))
    assert c.train.iterations == 60 * ((10582 - 1464) // 16) and c.eval.mode == "whole"
    assert (c.unimatch_v2.threshold, c.unimatch_v2.ema_decay, c.unimatch.cutmix_prob) == (0.95, 0.996, 0.5)
    c = load_config(configs / "cityscapes/1_16/unimatch_v2_weighting.yaml")
    assert (c.data.crop_size, c.train.batch_size, c.train.iterations) == (798, 8, 180 * ((2975 - 186) // 8))
    assert (c.loss.labelled, c.loss.ohem_threshold, c.loss.ohem_min_kept) == ("ohem", 0.7, 100000)
    assert (c.eval.mode, c.eval.window) == ("sliding", None) and c.weighting.enabled  # window = the 798 crop
    c = load_config(configs / "coco/1_512/unimatch_v2.yaml")
    assert (c.data.crop_size, c.train.iterations, c.eval.mode) == (518, 20 * ((118287 - 232) // 16), "whole")
    assert not (configs / "voc/blended/1_16/unimatch_v2.yaml").exists()


def test_two_processes_with_the_teacher_outside_ddp(tmp_path):
    """``--nproc 2`` (gloo): the student under DDP, the EMA teacher outside it; the trainer checks at every
    checkpoint that both are equal on the two ranks (it stops otherwise), and both are evaluated."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = ["train.batch_size=4", "train.unlabelled_batch_size=4", "train.iterations=2", "train.eval_interval=2",
            "weighting.enabled=true", "weighting.labelled_threshold=0", "train.amp=off", f"output_dir={run_dir}",
            "--nproc", "2"]
    proc = subprocess.run([sys.executable, "-m", "hafis", "train", str(TINY), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    assert len(evals) == 1 and "miou_student" in evals[0]
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000002.pt", map_location="cpu", weights_only=False)
    assert state["framework"]["ema_updates"] == 2
    assert not any(k.startswith("module.") for k in state["framework"]["teacher"])
    assert not all(torch.equal(state["student"][k], v) for k, v in state["framework"]["teacher"].items())


def test_bf16_autocast_run_on_cpu(tmp_path, conv_output_dtypes):
    records = train(tmp_path / "run", "train.amp=bf16")
    assert conv_output_dtypes == {torch.bfloat16}  # the DPT's convolutions (patch embedding included) ran in bf16
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["loss"] == r["loss"] and r["loss_s1"] > 0 for r in steps)
