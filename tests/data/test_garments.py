"""Tests of the garments dataset on hand-made Fashion-MNIST idx files (the real dataset is never needed)."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hafis.cli import main
from hafis.config import ConfigError, load_config
from hafis.data import build_sources
from hafis.data import garments as garments_module
from hafis.data.base import IGNORE_INDEX, DataError
from hafis.data.garments import (
    COARSE_CLASSES,
    FINE_CLASSES,
    GarmentScenes,
    GarmentsConfig,
    garment_splits,
    load_fashion_mnist,
    read_idx,
)
from hafis.engine.run_log import read_metrics

TINY = Path(__file__).parent.parent.parent / "configs" / "tiny"
TRAIN_LABELS = np.array([0, 1, 0, 1, 0, 1], np.uint8)  # T-shirt/top (fine 1), trouser (fine 2)
TEST_LABELS = np.array([8, 9, 8, 9], np.uint8)  # bag (fine 9), ankle boot (fine 10)


def _garment(label: int, seed: int) -> np.ndarray:
    """A 28x28 garment-like blob: an opaque silhouette per label with random shading (all pixels >= 40)."""
    g = np.zeros((28, 28), np.uint8)
    shade = np.random.default_rng(seed).integers(40, 256, (28, 28)).astype(np.uint8)
    if label in (0, 8):  # a wide block with a notch
        g[4:24, 5:23] = shade[4:24, 5:23]
        g[4:9, 11:17] = 0
    else:  # two legs
        g[3:25, 7:12] = shade[3:25, 7:12]
        g[3:25, 16:21] = shade[3:25, 16:21]
        g[3:8, 7:21] = shade[3:8, 7:21]
    return g


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_fake_fashion_mnist(folder: Path, train_images=None, test_images=None, compress: bool = True) -> Path:
    if train_images is None:
        train_images = np.stack([_garment(int(c), i) for i, c in enumerate(TRAIN_LABELS)])
    if test_images is None:
        test_images = np.stack([_garment(int(c), 100 + i) for i, c in enumerate(TEST_LABELS)])
    _write_idx(folder / "train-images-idx3-ubyte", train_images, compress)
    _write_idx(folder / "train-labels-idx1-ubyte", TRAIN_LABELS[:len(train_images)], compress)
    _write_idx(folder / "t10k-images-idx3-ubyte", test_images, compress)
    _write_idx(folder / "t10k-labels-idx1-ubyte", TEST_LABELS[:len(test_images)], compress)
    return folder


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def cfg(fake_root) -> GarmentsConfig:
    return GarmentsConfig(root=str(fake_root), image_size=40, num_train=24, num_labelled=6, num_val=8,
                          objects=(1, 3), scale=(0.3, 0.7), seed=5)


def _bytes(source: GarmentScenes) -> list[bytes]:
    out = []
    for i in range(len(source)):
        s = source.load(i)
        out.append(s.image.tobytes() + s.mask.tobytes() + s.boxes.tobytes() + s.box_labels.tobytes())
    return out


def _layers(source: GarmentScenes, index: int):
    part = source._part
    return part.render(int(source.indices[index]), load_fashion_mnist(part.paths))


# ------------------------------------------------------------------------------------------- determinism, cache
def test_same_seed_same_bytes_with_and_without_cache_and_another_seed_differs(cfg, tmp_path):
    reference = [_bytes(s) for s in garment_splits(cfg, cache_dir=False)]
    written = [_bytes(s) for s in garment_splits(cfg, cache_dir=tmp_path)]
    cached = list((tmp_path / "garments").glob("*.npz"))
    assert len(cached) == 2  # one pool (shared by labelled / unlabelled) + one val set
    read_back = [_bytes(s) for s in garment_splits(cfg, cache_dir=tmp_path)]
    assert reference == written == read_back
    other = [_bytes(s) for s in garment_splits(replace(cfg, seed=6), cache_dir=False)]
    for a, b in zip(reference, other, strict=True):
        assert all(x != y for x, y in zip(a, b, strict=True))


def test_the_cache_is_read_not_regenerated(cfg, tmp_path, monkeypatch):
    first = _bytes(garment_splits(cfg, cache_dir=tmp_path)[0])

    def fail(*args, **kwargs):
        raise AssertionError("generated again despite a cache")

    monkeypatch.setattr(garments_module._Part, "generate", fail)
    assert _bytes(garment_splits(cfg, cache_dir=tmp_path)[0]) == first


def test_a_corrupt_cache_is_regenerated_with_a_warning(cfg, tmp_path):
    first = _bytes(garment_splits(cfg, cache_dir=tmp_path)[2])
    for path in (tmp_path / "garments").glob("*_val_*.npz"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        assert _bytes(garment_splits(cfg, cache_dir=tmp_path)[2]) == first


def test_pool_images_do_not_depend_on_split_sizes(cfg):
    _, small_unlabelled, _ = garment_splits(cfg, cache_dir=False)
    big = replace(cfg, num_train=40, num_labelled=20)
    labelled, unlabelled, _ = garment_splits(big, cache_dir=False)
    by_id = {}
    for source in (labelled, unlabelled):
        for i, sample_id in enumerate(source.ids):
            by_id[sample_id] = source.load(i)
    for i, sample_id in enumerate(small_unlabelled.ids):
        a, b = small_unlabelled.load(i), by_id[sample_id]
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()


# ---------------------------------------------------------------------------------------------------- splits
def test_labelled_is_a_seeded_subset_of_the_pool_and_nested_across_sizes(cfg):
    pool = {f"train_{i:06d}" for i in range(cfg.num_train)}
    previous: set = set()
    for n in (0, 3, 6, 12, 24):
        labelled, unlabelled, _ = garment_splits(replace(cfg, num_labelled=n), cache_dir=False)
        lab, unl = set(labelled.ids), set(unlabelled.ids)
        assert len(lab) == n and len(unl) == cfg.num_train - n
        assert lab | unl == pool and not lab & unl
        assert previous <= lab
        previous = lab
    other = garment_splits(replace(cfg, split_seed=99), cache_dir=False)[0]
    assert set(other.ids) != set(garment_splits(cfg, cache_dir=False)[0].ids)


def test_num_unlabelled_takes_the_next_images_of_the_same_permutation(cfg):
    labelled, unlabelled, _ = garment_splits(cfg, cache_dir=False)
    previous: set = set()
    for n in (0, 5, 10, cfg.num_train - cfg.num_labelled):
        lab, unl, _ = garment_splits(replace(cfg, num_unlabelled=n), cache_dir=False)
        assert lab.ids == labelled.ids  # the labelled split does not move
        assert len(unl) == n and set(unl.ids) <= set(unlabelled.ids) and previous <= set(unl.ids)
        previous = set(unl.ids)
    assert previous == set(unlabelled.ids)
    with pytest.raises(ValueError, match="num_unlabelled"):
        replace(cfg, num_unlabelled=cfg.num_train - cfg.num_labelled + 1)


def test_the_labelled_split_is_fixed_across_seeds_and_arms(fake_root, tmp_path):
    """The run's seed (initialisation, order, augmentation) and the framework never move the labelled split; only
    ``data.garments.split_seed`` draws another."""
    def split(*overrides):
        config = load_config(TINY / "garments.yaml", [f"data.garments.root={fake_root}", "data.garments.split_seed=3",
                                                      f"data.cache_dir={tmp_path}", *overrides])
        labelled, unlabelled, _ = build_sources(config.data)
        return labelled.ids, unlabelled.ids

    reference = split()
    for overrides in (["seed=1"], ["seed=7", "train.framework=supervised"], ["seed=2", "weighting.enabled=true"],
                      ["data.garments.seed=4"]):
        assert split(*overrides) == reference, overrides
    assert split("data.garments.split_seed=4")[0] != reference[0]


def test_validation_comes_from_the_test_files_and_the_pool_from_the_train_files(cfg):
    labelled, unlabelled, val = garment_splits(cfg, cache_dir=False)
    for source, allowed in ((labelled, {1, 2}), (unlabelled, {1, 2}), (val, {9, 10})):
        seen = set()
        for i in range(len(source)):
            s = source.load(i)
            classes = set(np.unique(s.mask).tolist()) - {0, IGNORE_INDEX}
            assert classes <= allowed and set(s.box_labels.tolist()) <= allowed, source.split
            seen |= classes
        assert seen == allowed, source.split
    assert all(i.startswith("val_") for i in val.ids) and len(val) == cfg.num_val


# ------------------------------------------------------------------------------------- masks, boxes, layers
def test_every_labelled_pixel_lies_on_an_opaque_garment_of_its_class(cfg):
    data = load_fashion_mnist(garment_splits(cfg, cache_dir=False)[0]._part.paths)
    for source in garment_splits(cfg, cache_dir=False):
        for i in range(len(source)):
            layers = _layers(source, i)
            sample = source.load(i)
            assert layers.image.tobytes() == sample.image.tobytes()
            # the visible garment of a pixel, recomposed from the alphas: the last one opaque there
            visible = np.zeros(sample.mask.shape, np.int64)
            for k, alpha in enumerate(layers.alphas, start=1):
                visible[alpha >= 1] = k
            np.testing.assert_array_equal(visible, layers.instances)
            labels = data.test_labels if source.split == "val" else data.train_labels
            classes = np.concatenate([[0], labels[layers.sources].astype(np.int64) + 1])
            known = sample.mask != IGNORE_INDEX
            np.testing.assert_array_equal(sample.mask[known], classes[visible][known])
            # where no garment reaches, the image is the background crop, untouched
            bare = (layers.alphas == 0).all(axis=0)
            np.testing.assert_array_equal(sample.image[bare], layers.background[bare])


def test_boxes_are_tight_around_each_visible_garment(cfg):
    for source in garment_splits(cfg, cache_dir=False):
        for i in range(len(source)):
            layers = _layers(source, i)
            sample = source.load(i)
            expected = []
            for k in range(1, len(layers.sources) + 1):
                ys, xs = np.nonzero((layers.instances == k) & (sample.mask != IGNORE_INDEX))
                if len(ys) >= garments_module.MIN_VISIBLE_AREA:
                    expected.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            np.testing.assert_array_equal(sample.boxes, np.asarray(expected, np.float32).reshape(-1, 4))


def test_a_solid_square_garment_gives_exact_mask_band_and_box(tmp_path):
    squares = np.full((2, 28, 28), 200, np.uint8)  # opaque everywhere: the pasted garment is a side x side square
    root = write_fake_fashion_mnist(tmp_path / "sq", train_images=squares, test_images=squares)
    cfg = GarmentsConfig(root=str(root), image_size=32, num_train=30, num_labelled=0, num_val=1, objects=(1, 1),
                         scale=(0.5, 0.5))
    _, pool, _ = garment_splits(cfg, cache_dir=False)
    inside = 0
    for i in range(len(pool)):
        s = pool.load(i)
        x0, y0, x1, y1 = s.boxes[0]
        if x0 == 1 or y0 == 1 or x1 == 31 or y1 == 31 or min(x0, y0) == 0 or max(x1, y1) == 32:
            continue  # touches the image edge: truncated
        inside += 1
        # a 16 px square: 14 x 14 labelled, a 1 px ignore ring inside it and one outside it whose 4 corners only
        # touch the square diagonally (the band is 4-neighbour)
        assert (x1 - x0, y1 - y0) == (14, 14)
        assert (s.mask[int(y0):int(y1), int(x0):int(x1)] == s.box_labels[0]).all()
        assert (s.mask == s.box_labels[0]).sum() == 14 * 14
        assert (s.mask == IGNORE_INDEX).sum() == 18 * 18 - 14 * 14 - 4
    assert inside >= 5


def test_coarse_classes_group_the_fine_ones(cfg):
    fine = garment_splits(cfg, cache_dir=False)
    coarse = garment_splits(replace(cfg, classes="coarse"), cache_dir=False)
    assert fine[0].class_names == FINE_CLASSES and coarse[0].class_names == COARSE_CLASSES
    assert tuple(coarse[0].thing_classes) == (1, 2, 3, 4, 5) and len(fine[0].thing_classes) == 10
    group = {"background": "background", "T-shirt/top": "top", "pullover": "top", "coat": "top", "shirt": "top",
             "trouser": "trouser", "dress": "dress", "sandal": "footwear", "sneaker": "footwear",
             "ankle boot": "footwear", "bag": "bag"}
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for fine_id, name in enumerate(FINE_CLASSES):
        lut[fine_id] = COARSE_CLASSES.index(group[name])
    for a, b in zip(fine, coarse, strict=True):
        for i in range(len(a)):
            sa, sb = a.load(i), b.load(i)
            np.testing.assert_array_equal(lut[sa.mask], sb.mask)
            np.testing.assert_array_equal(lut[sa.box_labels], sb.box_labels)
            np.testing.assert_array_equal(sa.image, sb.image)


# ------------------------------------------------------------------------------------------ finding the files
def test_missing_fashion_mnist_names_the_paths_and_how_to_get_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        garment_splits(GarmentsConfig(root=str(empty)), cache_dir=False)
    message = str(err.value)
    assert str(empty) in message and "\n" not in message
    for hint in ("apt-get install dataset-fashion-mnist", "data.garments.root", "data.garments.download: true"):
        assert hint in message

    monkeypatch.setenv("HAFIS_FASHION_MNIST", str(tmp_path / "env"))
    monkeypatch.setattr(garments_module, "_DEBIAN_DIR", str(tmp_path / "debian"))
    with pytest.raises(DataError) as err:
        garment_splits(GarmentsConfig(), cache_dir=tmp_path / "cache")
    searched = [str(tmp_path / "env"), str(tmp_path / "debian"), str(tmp_path / "cache" / "FashionMNIST" / "raw")]
    positions = [str(err.value).index(p) for p in searched]
    assert positions == sorted(positions)


def test_search_order_and_raw_files(tmp_path, monkeypatch):
    monkeypatch.setattr(garments_module, "_DEBIAN_DIR", str(tmp_path / "debian"))
    monkeypatch.delenv("HAFIS_FASHION_MNIST", raising=False)
    raw = write_fake_fashion_mnist(tmp_path / "cache" / "FashionMNIST" / "raw", compress=False)
    found = garments_module.find_fashion_mnist(GarmentsConfig(), tmp_path / "cache")
    assert found["train_images"] == raw / "train-images-idx3-ubyte"
    write_fake_fashion_mnist(tmp_path / "debian")
    found = garments_module.find_fashion_mnist(GarmentsConfig(), tmp_path / "cache")
    assert found["test_labels"] == tmp_path / "debian" / "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setenv("HAFIS_FASHION_MNIST", str(write_fake_fashion_mnist(tmp_path / "env")))
    found = garments_module.find_fashion_mnist(GarmentsConfig(), tmp_path / "cache")
    assert found["train_labels"].parent == tmp_path / "env"
    np.testing.assert_array_equal(read_idx(raw / "train-labels-idx1-ubyte"), TRAIN_LABELS)


def test_download_uses_torchvision_into_the_cache(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(garments_module, "_DEBIAN_DIR", str(tmp_path / "debian"))
    monkeypatch.delenv("HAFIS_FASHION_MNIST", raising=False)
    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        write_fake_fashion_mnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    found = garments_module.find_fashion_mnist(GarmentsConfig(download=True), tmp_path / "cache")
    assert found["train_images"].parent == tmp_path / "cache" / "FashionMNIST" / "raw"
    assert calls == [(str(tmp_path / "cache"), True, True), (str(tmp_path / "cache"), False, True)]


def test_a_truncated_idx_file_is_named(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "bad", compress=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


# ---------------------------------------------------------------------------------------- config and the CLI
def test_config_section_and_its_errors(fake_root):
    config = load_config(TINY / "garments.yaml", [f"data.garments.root={fake_root}"])
    labelled, unlabelled, val = build_sources(config.data)
    assert (len(labelled), len(unlabelled), len(val)) == (4, 12, 4)
    assert labelled.class_names == COARSE_CLASSES
    with pytest.raises(ConfigError, match="data.garments.classes"):
        load_config(TINY / "garments.yaml", ["data.garments.classes=medium"])
    with pytest.raises(ConfigError, match="num_labelled"):
        load_config(TINY / "garments.yaml", ["data.garments.num_labelled=17"])


@pytest.mark.parametrize("framework,labelled", [("unimatch", 4), ("supervised", 16)])
def test_train_end_to_end(tmp_path, fake_root, capsys, framework, labelled):
    run_dir = tmp_path / "run"
    code = main(["train", str(TINY / "garments.yaml"), f"data.garments.root={fake_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.framework={framework}",
                 f"data.garments.num_labelled={labelled}", "train.iterations=2", "train.eval_interval=2",
                 "eval.diagnostics_images=4", f"output_dir={run_dir}"])
    assert code == 0, capsys.readouterr().err
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["iteration"] for r in evals] == [2]
    assert set(evals[0]["iou_by_class"]) == set(COARSE_CLASSES)
    # pseudo-labels are measured where there are unlabelled images; a fully supervised run has none to measure
    assert ("diagnostics" in evals[0]) == (labelled < 16)


def test_semi_supervised_with_no_unlabelled_image_is_a_one_line_error(tmp_path, fake_root, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", str(TINY / "garments.yaml"), f"data.garments.root={fake_root}",
                 "data.garments.num_labelled=16", f"output_dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unlabelled split is empty" in err and "num_labelled=16" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_missing_fashion_mnist_exits_2_from_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", str(TINY / "garments.yaml"), f"data.garments.root={tmp_path / 'none'}",
                 f"output_dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()
