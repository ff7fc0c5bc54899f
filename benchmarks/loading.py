"""Does data loading starve training? Step time with the trainer's real data streams vs a preloaded batch.

    python benchmarks/loading.py                          # tiny and demo-quick configs, 0 and 2 workers
    python benchmarks/loading.py --preset r50 --steps 5   # DeepLabV3+ ResNet-50 at 321 crop, batch 2+2

The trainer's own streams (:meth:`hafis.engine.trainer.Trainer._streams`: seeded infinite samplers, persistent
workers when ``data.num_workers > 0``, pinned memory on CUDA, ``torch.set_num_threads(1)`` in every worker, which
PyTorch's worker loop does itself) feed a UniMatch step with the weighting on and the paper's detector rule. The
detections are the synthetic scenes' instance boxes, stored in the same in-memory :class:`Detections` table
``hafis detect`` caches, so each unlabelled sample draws its box mask by index through :class:`BoxMaskProvider`
(no file is parsed per step).

Reported per preset and worker count: ``load`` = the median wall time of fetching one labelled + one unlabelled
batch alone; ``step, loaded`` = fetch + step; ``step, preloaded`` = the same step on one batch fetched beforehand;
``starved`` = loaded / preloaded - 1. Medians of ``--steps`` iterations after ``--warmup``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import footer, header, median, table

from hafis.config import load_config
from hafis.detection.cache import BoxMaskProvider, Detections
from hafis.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "tiny": (ROOT / "configs/tiny/unimatch.yaml", []),
    "demo-quick": (ROOT / "src/hafis/demo/configs/demo_quick.yaml",
                   ["data.synthetic.num_unlabelled=64", "data.synthetic.num_val=8"]),
    "r50": (None, ["model.backbone=resnet50", "data.crop_size=321", "train.batch_size=2",
                   "train.unlabelled_batch_size=2", "data.synthetic.image_size=384",
                   "data.synthetic.num_labelled=8", "data.synthetic.num_unlabelled=16", "data.synthetic.num_val=4"]),
}


def instance_box_provider(source, num_classes: int) -> BoxMaskProvider:
    """The synthetic scenes' instance boxes as detections scoring 1.0, served like the detection cache."""
    per_image, ids = [], []
    for i in range(len(source)):
        sample = source.load(i)
        per_image.append({"boxes": sample.boxes, "labels": sample.box_labels,
                          "scores": [1.0] * len(sample.box_labels), "size": sample.image.shape[:2]})
        ids.append(sample.id)
    return BoxMaskProvider(Detections.concatenate(ids, per_image), num_classes, tau_det=0.95)


def run(preset: str, workers: int, args) -> list:
    path, overrides = PRESETS[preset]
    cfg = load_config(path, list(overrides) + [
        "weighting.enabled=true", "weighting.reliable=confidence", f"data.num_workers={workers}",
        "model.pretrained=null", f"train.device={args.device}", "train.progress_bar=false",
        "train.tensorboard=false"])
    trainer = Trainer(cfg)
    cfg.weighting.reliable = "detector"  # the paper's rule, with the box masks served below
    trainer.box_masks = instance_box_provider(trainer.unlabelled_source, trainer.num_classes)
    framework, optimizer, device = trainer.framework, trainer.optimizer, trainer.device
    trainer.model.train()
    labelled, unlabelled = trainer._streams()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fetch():
        return next(labelled), next(unlabelled)

    def step(batch):
        out = framework.train_step(batch[0], batch[1], 0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sync()

    for _ in range(args.warmup):  # worker start-up, first-touch allocations
        step(fetch())
    fixed = fetch()
    load_t, loaded_t, preloaded_t = [], [], []
    for i in range(args.steps):
        start = time.perf_counter()
        batch = fetch()
        sync()
        load_t.append(time.perf_counter() - start)
        step(batch)
        loaded_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(fixed)
        preloaded_t.append(time.perf_counter() - start)
    labelled = unlabelled = None  # drops the streams' loaders, which shuts their workers down
    lo, pre = median(loaded_t), median(preloaded_t)
    return [preset, workers, cfg.data.crop_size, f"{cfg.train.batch_size}+{cfg.train.unlabelled_batch_size}",
            median(load_t) * 1e3, lo * 1e3, pre * 1e3, 100 * (lo / pre - 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "demo-quick"], choices=sorted(PRESETS))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header("Data loading vs a preloaded batch (UniMatch + weighting, detector rule)")
    rows = [run(preset, workers, args) for preset in args.preset for workers in args.workers]
    table(["preset", "workers", "crop", "batch", "load ms", "step, loaded ms", "step, preloaded ms", "starved %"],
          rows)
    footer()


if __name__ == "__main__":
    main()
