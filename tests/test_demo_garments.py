"""``hafis demo`` picks the garments when Fashion-MNIST is installed and says how to get it when it is not."""

import gzip
import struct

import numpy as np

import hafis.data.garments as garments_module
from hafis.demo import run_demo
from hafis.demo.run import demo_data

TINY = ["data.garments.image_size=32", "data.crop_size=32", "data.garments.num_train=12",
        "data.garments.num_labelled=4", "data.garments.num_val=4", "train.iterations=2", "train.eval_interval=2",
        "train.log_interval=1", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.progress_bar=false",
        "model.backbone=resnet_tiny", "model.pretrained=null", "model.feature_dim=16", "model.aspp_channels=16",
        "eval.batch_size=4"]


def _idx(path, array):
    # the idx format: magic (0, 0, dtype 0x08 = uint8, number of dimensions), big-endian sizes, then the bytes
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = rng.integers(120, 255, (20, 16, 12))
    for prefix in ("train", "t10k"):
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return folder


def test_auto_falls_back_to_the_synthetic_scenes_and_says_how_to_get_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(garments_module, "_DEBIAN_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("HAFIS_FASHION_MNIST", raising=False)
    monkeypatch.setenv("HAFIS_CACHE", str(tmp_path / "cache"))
    logs = []
    assert demo_data("auto", logs.append) == "synthetic"
    assert len(logs) == 1 and "apt-get install dataset-fashion-mnist" in logs[0] and "synthetic scenes" in logs[0]
    assert demo_data("garments", logs.append) == "garments" and len(logs) == 1  # an explicit choice is kept


def test_garments_demo_is_the_three_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HAFIS_FASHION_MNIST", str(fake_fashion_mnist(tmp_path / "fmnist")))
    monkeypatch.setenv("HAFIS_CACHE", str(tmp_path / "cache"))
    assert demo_data("auto", print) == "garments"
    records = run_demo(tmp_path / "out", quick=False, overrides=TINY, log=lambda m: None)
    assert [r.label.split(" (")[0] for r in records] == ["supervised", "unimatch", "unimatch + W"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`garments.yaml` (Fashion-MNIST garments on real photographs" in report
