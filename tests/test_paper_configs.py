"""The paper-setting configs: generated files up to date, every one loads, the published numbers are in them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hafis.config import load_config, to_dict

CONFIGS = Path(__file__).parent.parent / "configs"


def _generator():
    spec = importlib.util.spec_from_file_location("make_paper_configs", CONFIGS / "make_paper_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generated_configs_are_up_to_date_and_complete():
    gen = _generator()
    assert gen.main(["--check"]) == 0, "rerun: python configs/make_paper_configs.py"
    names = {p.relative_to(CONFIGS).as_posix() for p in gen.files()}
    for n in (92, 183, 366, 732, 1464):
        for fw in ("unimatch", "u2pl", "ael", "augseg", "segformer_unimatch"):
            assert {f"voc/classic/{n}/{fw}.yaml", f"voc/classic/{n}/{fw}_weighting.yaml"} <= names
    for split in ("1_16", "1_8", "1_4"):
        for fw in ("unimatch", "u2pl", "ael", "augseg"):
            assert f"voc/blended/{split}/{fw}_weighting.yaml" in names
    for split in ("1_16", "1_8", "1_4", "1_2"):
        for fw in ("unimatch", "u2pl", "ael", "augseg"):
            assert f"cityscapes/{split}/{fw}.yaml" in names
    for split in ("1_512", "1_256", "1_128", "1_64", "1_32"):
        assert {f"coco/{split}/unimatch.yaml", f"coco/{split}/unimatch_weighting.yaml"} <= names
    # Cityscapes 1/30: the seed paper's authors' list, published by UniMatch V2 only
    assert {f"cityscapes/1_30/{fw}{w}.yaml" for fw in ("unimatch", "unimatch_v2") for w in ("", "_weighting")} <= names
    assert not any(n.startswith("cityscapes/1_30/") and n.split("/")[-1].startswith(("u2pl", "ael", "augseg"))
                   for n in names)
    for split in ("1_64", "1_32", "1_16", "1_8", "1_4", "1_2"):
        assert {f"ade20k/{split}/unimatch_v2.yaml", f"ade20k/{split}/unimatch_v2_weighting.yaml"} <= names


@pytest.mark.parametrize("path", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")))
def test_every_config_loads(path):
    load_config(CONFIGS / path)


def test_published_settings():
    c = load_config(CONFIGS / "voc/classic/92/unimatch.yaml")
    assert (c.data.dataset, c.data.voc_setting, c.data.crop_size) == ("voc", "classic", 321)
    assert (c.train.batch_size, c.train.unlabelled_batch_size, c.optim.lr, c.optim.head_lr_multiplier) == \
        (8, 8, 0.001, 10.0)
    assert c.train.iterations == 80 * ((10582 - 92) // 8) == 104880 and c.eval.mode == "whole"
    assert c.data.labelled_split == "splits/unimatch/classic/92/labelled.txt" and c.model.backbone == "resnet101s"
    assert c.loss.labelled == "ce" and not c.weighting.enabled

    c = load_config(CONFIGS / "voc/blended/1_16/unimatch.yaml")
    assert c.data.voc_setting == "blended" and c.train.iterations == 80 * ((10582 - 662) // 8)

    c = load_config(CONFIGS / "cityscapes/1_16/unimatch.yaml")
    assert (c.data.crop_size, c.optim.lr, c.optim.head_lr_multiplier, c.unimatch.threshold) == (801, 0.005, 1.0, 0.0)
    assert c.train.iterations == 240 * ((2975 - 186) // 8) and c.loss.labelled == "ohem"
    assert (c.detector.boxes, c.detector.component_min_area, c.detector.component_classes) == \
        ("combined", 90, ["pole", "traffic light", "traffic sign"])
    assert (c.model.align_corners, c.unimatch.mix) == (None, "same_images")
    assert (c.eval.mode, c.eval.window, c.eval.stride) == ("sliding", None, None)  # = crop, 2/3 of it

    c = load_config(CONFIGS / "cityscapes/1_2/u2pl.yaml")
    assert (c.data.crop_size, c.train.batch_size, c.optim.lr, c.optim.weight_decay, c.model.output_stride) == \
        (769, 16, 0.01, 0.0005, 8)
    assert c.train.iterations == 200 * ((2975 - 1488) // 16) and c.u2pl.sup_only_iterations == 0
    assert (c.loss.labelled, c.loss.ohem_min_kept) == ("ohem", 50000)  # released: 100,000 per 2-image GPU batch

    c = load_config(CONFIGS / "coco/1_512/unimatch.yaml")
    assert (c.data.crop_size, c.optim.lr, c.train.iterations) == (513, 0.004, 30 * ((118287 - 232) // 8))
    assert c.eval.mode == "sliding"

    c = load_config(CONFIGS / "cityscapes/1_30/unimatch.yaml")
    assert c.data.labelled_split == "splits/unimatch/1_30/labelled.txt" and c.train.iterations == 240 * (2875 // 8)
    assert load_config(CONFIGS / "cityscapes/1_16/ael.yaml").data.unlabelled_split == "splits/u2pl/1_16/unlabelled.txt"
    assert load_config(CONFIGS / "voc/blended/1_8/unimatch.yaml").data.labelled_split == \
        "splits/u2pl/blended/1_8/labelled.txt"  # the only blended lists shipped

    # UniMatch V2 configs/ade20k.yaml: crop 518, 2 x 4 GPUs, 60 epochs, CE, lock_backbone: True
    c = load_config(CONFIGS / "ade20k/1_64/unimatch_v2.yaml")
    assert (c.data.dataset, c.data.crop_size, c.train.batch_size, c.train.unlabelled_batch_size) == \
        ("ade20k", 518, 8, 8)
    assert (c.model.name, c.model.backbone, c.model.freeze_encoder, c.optim.lr, c.optim.head_lr_multiplier) == \
        ("dpt", "dinov2_small", True, 5e-6, 40.0)
    assert (c.loss.labelled, c.unimatch_v2.threshold, c.eval.mode) == ("ce", 0.95, "whole")
    assert c.train.iterations == 60 * ((20210 - 316) // 8)
    assert not load_config(CONFIGS / "coco/1_512/unimatch_v2.yaml").model.freeze_encoder  # lock_backbone: False

    c = load_config(CONFIGS / "voc/classic/1464/segformer_unimatch.yaml")
    assert (c.model.name, c.model.backbone, c.optim.name) == ("segformer", "mit_b5", "adamw")


def test_split_files_are_the_shipped_published_lists():
    """Each leaf reads splits/<protocol>/[<setting>/]<split>/, which `hafis prepare --published` writes, and its
    iterations count the labelled images of that shipped list."""
    from hafis.data import published

    train_images = {"coco": 118287}  # COCO's training set is the tree's train2017
    leaves = [p for d in ("voc", "cityscapes", "coco", "ade20k") for p in (CONFIGS / d).rglob("*.yaml")
              if p.parent.parent.name != "configs" and not p.name.endswith("_weighting.yaml")]
    assert len(leaves) == 5 * 6 + 3 * 4 + 5 * 5 - 3 + 5 * 2 + 6, len(leaves)
    for path in leaves:
        c = load_config(path)
        parts = c.data.labelled_split.split("/")
        assert parts[0] == "splits" and parts[-1] == "labelled.txt", path
        assert c.data.unlabelled_split == "/".join(parts[:-1] + ["unlabelled.txt"]), path
        protocol, folder, setting = parts[1], parts[-2], parts[2] if len(parts) == 5 else None
        assert setting == (c.data.voc_setting if c.data.dataset == "voc" else None), path
        release = published.release(protocol, c.data.dataset)
        (split,) = published.select(release, setting, folder)
        lists = published.read_lists(release)
        n_train = train_images.get(c.data.dataset) or len({line.split()[0] for m in release.train for line in lists[m]})
        labelled = len(lists[split.member])
        assert c.train.eval_interval == (n_train - labelled) // c.train.unlabelled_batch_size, path
        assert f"{release.repo} {release.path}/" in path.read_text(), path  # the header names the list


def test_weighting_variants_differ_only_in_the_method_and_name():
    for path in CONFIGS.rglob("*_weighting.yaml"):
        if path.parent.name in ("synthetic", "tiny"):
            continue
        on = to_dict(load_config(path))
        off = to_dict(load_config(path.with_name(path.name.replace("_weighting", ""))))
        assert on["weighting"]["enabled"] and not off["weighting"]["enabled"]
        on["weighting"]["enabled"] = False
        assert on.pop("name") == off.pop("name") + "-weighting"
        assert on == off, path


def test_released_u2pl_and_ael_recipes():
    # U2PL VOC: plain CE (experiments/pascal/1464/ours `criterion: CELoss`); Cityscapes keeps OHEM
    assert load_config(CONFIGS / "voc/classic/1464/u2pl.yaml").loss.labelled == "ce"
    assert load_config(CONFIGS / "voc/blended/1_16/u2pl.yaml").loss.labelled == "ce"
    # AEL: the release divides every loss by its 8 GPUs before DDP averages: lr / 8, weight decay x 8, head x10
    for path, threshold in (("voc/classic/92/ael.yaml", 0.7), ("cityscapes/1_16/ael.yaml", 0.0)):
        c = load_config(CONFIGS / path)
        assert (c.optim.lr, c.optim.head_lr_multiplier, c.optim.weight_decay) == (0.00125, 10.0, 0.0008), path
        assert c.ael.threshold == threshold, path


def test_every_paper_config_synchronises_batchnorm():
    for dataset in ("voc", "cityscapes", "coco", "ade20k"):
        for path in (CONFIGS / dataset).rglob("*.yaml"):
            assert load_config(path).train.sync_bn, path  # as every release runs
