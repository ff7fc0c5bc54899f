import pytest

from hafis.cli import main
from hafis.config import ConfigError, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_and_overrides(tmp_path):
    path = write(tmp_path, "a.yaml", "name: x\ntrain: {iterations: 7}\nweighting: {enabled: true}\n")
    config = load_config(path, ["train.batch_size=3", "weighting.offset=1", "data.scale_range=[1, 2]",
                                "optim.lr=1e-4"])
    assert config.optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert config.name == "x" and config.train.iterations == 7 and config.train.batch_size == 3
    assert config.weighting.enabled is True and config.weighting.offset == 1.0
    assert isinstance(config.weighting.offset, float)
    assert config.data.scale_range == (1.0, 2.0)
    assert config.weighting.k == 5  # default kept


def test_base_chain(tmp_path):
    write(tmp_path, "base.yaml", "name: base\ntrain: {iterations: 7, batch_size: 5}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {iterations: 9}\n")
    config = load_config(child)
    assert (config.name, config.train.iterations, config.train.batch_size) == ("base", 9, 5)


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    path = write(tmp_path, "a.yaml", "train: {iteratons: 7}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.iteratons" in message and "did you mean 'train.iterations'" in message
    assert str(path) in message and "batch_size" in message


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.iterations=many", "'train.iterations' must be int"),
        ("weighting.enabled=3", "'weighting.enabled' must be bool"),
        ("weighting.normalize=sum", "'weighting.normalize' must be one of"),
        ("train.framework=fixmatch", "'train.framework' must be one of"),
        ("data.scale_range=[1]", "'data.scale_range' must be a list of 2"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("train=3", "'train' must be a mapping"),
        ("data.synthetic.image_size=4", r"'data.synthetic.image_size' must be in \[16, 4096\], got 4"),
        ("oops", "key=value"),
    ],
)
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "a: [1,\n"))


@pytest.mark.parametrize("key,registry", [("train.framework", "hafis.frameworks:FRAMEWORKS"),
                                          ("model.name", "hafis.models:SEGMENTERS"),
                                          ("detector.arch", "hafis.detection.networks:ARCHITECTURES"),
                                          ("detector.boxes", "hafis.detection.train:BOX_MODES"),
                                          ("data.dataset", "hafis.data:DATASETS"),
                                          ("optim.name", "hafis.engine.optim:OPTIMIZERS"),
                                          ("loss.labelled", "hafis.frameworks.losses:LABELLED_LOSSES"),
                                          ("unimatch.mix", "hafis.frameworks.unimatch:MIXES"),
                                          ("weighting.normalize", "hafis.weighting.loss:NORMALIZE_MODES"),
                                          ("weighting.stuff", "hafis.weighting.reliable:STUFF_MODES"),
                                          ("weighting.align", "hafis.weighting.alignment:ALIGN_MODES")])
def test_registry_keys_accept_exactly_the_registered_names(tmp_path, monkeypatch, key, registry):
    import importlib
    import re

    module, _, attribute = registry.partition(":")
    names = getattr(importlib.import_module(module), attribute)
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be one of {list(names)}, got 'not-registered'")):
        load_config(path, [f"{key}=not-registered"])
    # a newly registered name is valid at once, without touching the config module
    if isinstance(names, dict):
        monkeypatch.setitem(names, "not-registered", None)
    else:
        monkeypatch.setattr(importlib.import_module(module), attribute, (*names, "not-registered"))
    section, _, field = key.partition(".")
    assert getattr(getattr(load_config(path, [f"{key}=not-registered"]), section), field) == "not-registered"


def test_backbone_names_come_from_the_chosen_segmenter():
    from hafis.models import SEGMENTERS

    for name, segmenter in SEGMENTERS.items():
        backbone = segmenter.backbones[0]
        config = load_config(None, [f"model.name={name}", f"model.backbone={backbone}", "data.crop_size=70"])
        assert config.model.backbone == backbone
    assert "resnet50" in SEGMENTERS["deeplabv3plus"].backbones and "resnet50" not in SEGMENTERS["segformer"].backbones
    with pytest.raises(ConfigError, match=r"'model.backbone' must be one of \[.*'resnet50'.*\] with 'model.name' "
                                          r"'deeplabv3plus', got 'resnet5'"):
        load_config(None, ["model.backbone=resnet5"])
    with pytest.raises(ConfigError, match=r"'model.backbone' must be one of \['mit_b0'.*with 'model.name' 'segformer'"):
        load_config(None, ["model.name=segformer", "model.backbone=resnet50"])


def test_a_segmenter_key_of_another_segmenter_is_refused_by_name():
    from hafis.engine.build import segmenter_keys

    assert segmenter_keys(load_config(None, ["model.output_stride=8"]).model) == \
        {"output_stride": 8, "aspp_channels": 256, "multi_grid": False}
    assert segmenter_keys(load_config(None, ["model.name=segformer", "model.backbone=mit_b0"]).model) == {}
    assert segmenter_keys(load_config(None, ["model.name=segformer", "model.backbone=mit_b0",
                                             "model.aspp_channels=32"]).model) == {}  # a size of another model
    with pytest.raises(ConfigError, match="model.multi_grid=True is a key of model.name=deeplabv3plus, not of "
                                          "'segformer'"):
        segmenter_keys(load_config(None, ["model.name=segformer", "model.backbone=mit_b0",
                                          "model.multi_grid=true"]).model)


def test_only_unimatch_asks_the_stream_for_cutmix_boxes():
    from hafis.frameworks import FrameworkContext, build_framework
    from hafis.models import DeepLabV3Plus

    model = DeepLabV3Plus(3, backbone="resnet_tiny", feature_dim=16, aspp_channels=16)
    for framework, expected in (("unimatch", 0.3), ("unimatch_v2", 0.3), ("u2pl", 0.0), ("supervised", 0.0)):
        config = load_config(None, [f"train.framework={framework}", "unimatch.cutmix_prob=0.3",
                                    "unimatch_v2.complementary_dropout=false"])
        assert build_framework(config, model, FrameworkContext(3)).traits.cutmix_prob == expected


@pytest.mark.parametrize("files", [
    {"a.yaml": "base: a.yaml\nname: a\n"},  # itself
    {"a.yaml": "base: b.yaml\n", "b.yaml": "base: sub/c.yaml\n", "sub/c.yaml": "base: ../a.yaml\n"},  # a cycle of 3
])
def test_a_base_loop_is_named_not_a_recursion_error(tmp_path, capsys, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=r"'base' chain loops back to itself"):
        load_config(tmp_path / "a.yaml")
    assert main(["train", str(tmp_path / "a.yaml"), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loops back" in err and not (tmp_path / "run").exists()


def test_a_three_level_chain_is_no_loop_and_a_missing_base_is_named(tmp_path):
    write(tmp_path, "root.yaml", "train: {iterations: 7}\n")
    write(tmp_path, "mid.yaml", "base: root.yaml\ntrain: {batch_size: 5}\n")
    config = load_config(write(tmp_path, "leaf.yaml", "base: mid.yaml\nname: leaf\n"))
    assert (config.name, config.train.iterations, config.train.batch_size) == ("leaf", 7, 5)
    write(tmp_path, "bad.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "bad.yaml")


def test_the_word_off_of_a_mode_switch_is_the_mode_not_a_boolean(tmp_path):
    # YAML 1.1 reads an unquoted off / no as False: a switch whose choices hold "off" takes the word
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(write(tmp_path, "a.yaml", "train: {amp: off}\n")).train.amp == "off"
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match=r"'train.amp' must be one of \['off', 'bf16', 'fp16', 'auto'\], got 'on'"):
        load_config(None, ["train.amp=on"])  # True is "on", which is no mode of train.amp
    # a real boolean key keeps its boolean
    assert load_config(None, ["weighting.enabled=off"]).weighting.enabled is False
