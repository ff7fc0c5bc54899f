"""Samples per second of one data-loading worker: the labelled and unlabelled training samples at paper scale, this
checkout's augmentation pipeline beside a baseline revision's, measured in one run.

    python benchmarks/pipeline.py                      # baseline: the revision before the per-release geometry
    python benchmarks/pipeline.py --baseline HEAD~3 --repeat 30

The baseline's ``hafis/data/{base,transforms,ssl}.py`` are read with ``git show REV:...`` into a temporary package,
so both pipelines run in this process on the same in-memory images (no decoding: what is timed is the augmentation,
which is what a worker adds to reading the files). One thread (a DataLoader worker's setting). Presets: VOC (500x375
images, crop 513) and Cityscapes (2048x1024 images, crop 801, UniMatch's). Rounds alternate the two pipelines, so
load changes hit both; the ratio is new / baseline samples per second, the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import footer, header, median, table

from hafis.data import base as data_base
from hafis.data import ssl as data_ssl

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "72a6e48"
PRESETS = {"voc": ((375, 500), 513), "cityscapes": ((1024, 2048), 801)}


class Images(data_base.SegmentationSource):
    """Smooth random photographs-like images and blocky masks, made once, served from memory."""

    def __init__(self, size, n=4, num_classes=21, seed=0, sample_cls=data_base.Sample):
        rng = np.random.default_rng(seed)
        self.class_names = [f"class {c}" for c in range(num_classes)]
        h, w = size
        self.samples = []
        for i in range(n):
            coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
            image = np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:h, :w]
            noise = rng.integers(0, 32, (h, w, 3)).astype(np.uint8)
            mask = np.repeat(np.repeat(rng.integers(0, num_classes, (h // 32 + 1, w // 32 + 1)), 32, 0), 32, 1)
            self.samples.append(sample_cls(id=f"img{i}", image=np.ascontiguousarray(image + noise),
                                           mask=np.ascontiguousarray(mask[:h, :w].astype(np.uint8))))

    @property
    def ids(self):
        return [s.id for s in self.samples]

    def load(self, index):
        return self.samples[index]


def baseline_package(rev: str, folder: Path):
    """The revision's data modules as the package ``baseline_data`` (their relative imports kept)."""
    package = folder / "baseline_data"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("base", "transforms", "ssl"):
        text = subprocess.run(["git", "show", f"{rev}:src/hafis/data/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_data.ssl"), importlib.import_module("baseline_data.base")


def rate(dataset, repeat: int) -> float:
    start = time.perf_counter()
    for i in range(repeat):
        dataset[(i // len(dataset), i % len(dataset))]
    return repeat / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeat", type=int, default=12, help="samples per stream per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header("Data pipeline: samples per second of one worker")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old_ssl, old_base = baseline_package(args.baseline, Path(tmp))
        for preset in args.presets:
            size, crop = PRESETS[preset]
            new_src, old_src = Images(size), Images(size, sample_cls=old_base.Sample)
            pairs = {
                "labelled": (data_ssl.LabelledDataset(new_src, crop, (0.5, 2.0), seed=0),
                             old_ssl.LabelledDataset(old_src, crop, (0.5, 2.0), seed=0)),
                "unlabelled": (data_ssl.UnlabelledDataset(new_src, crop, (0.5, 2.0), seed=0, cutmix_prob=0.5),
                               old_ssl.UnlabelledDataset(old_src, crop, (0.5, 2.0), seed=0, cutmix_prob=0.5)),
            }
            for stream, (new, old) in pairs.items():
                rate(new, 2), rate(old, 2)  # warm-up
                ratios, news, olds = [], [], []
                for _ in range(args.rounds):
                    o = rate(old, args.repeat)
                    n = rate(new, args.repeat)
                    ratios.append(n / o), news.append(n), olds.append(o)
                rows.append([preset, stream, f"{median(olds):.2f}", f"{median(news):.2f}",
                             f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
                print(f"{preset} {stream}: baseline {median(olds):.2f}/s, now {median(news):.2f}/s, "
                      f"ratio {median(ratios):.2f}", flush=True)
    print()
    table(["preset", "stream", f"baseline {args.baseline} (samples/s)", "this checkout (samples/s)",
           "ratio, median (range)"], rows)
    footer()


if __name__ == "__main__":
    main()
