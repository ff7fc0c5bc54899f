"""Predict throughput on the CPU: eager torch (what ``hafis predict`` runs) vs the ``hafis export`` ONNX graph in
onnxruntime, side by side in one run.

    python benchmarks/predict.py                       # tiny ResNet and EfficientNet-Lite0 DeepLabV3+, 1 thread
    python benchmarks/predict.py --presets lite0 --repeat 20

Each preset's network (random initialisation: speed does not depend on the weights) is exported with
:func:`hafis.engine.export.export_model`, whose parity check is printed first. Then eager torch
(:meth:`hafis.Predictor.scores`: normalisation + whole-image forward, uint8 batch in) and an onnxruntime session
(CPU provider, ``--threads`` intra-op threads, one inter-op thread) run the same uint8 batch alternately, ``--repeat``
times each after a warm-up, so both see the same machine load. Reported: median seconds per batch, images per
second, and onnxruntime's speed relative to torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _common import footer, header, median, table  # noqa: E402

from hafis.config import load_config  # noqa: E402
from hafis.engine.build import build_model  # noqa: E402
from hafis.engine.export import export_model  # noqa: E402
from hafis.engine.inference import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: name -> (config overrides on the tiny config, classes, batch, image side)
PRESETS = {
    "tiny": (["model.backbone=resnet_tiny"], 4, 4, 128),
    # the realistic benchmark's network (configs/realistic/base.yaml: 5 garments + background)
    "lite0": (["model.backbone=efficientnet_lite0", "model.feature_dim=128", "model.aspp_channels=128",
               "model.pretrained=null"], 6, 1, 256),
}


def run(name: str, args) -> list:
    overrides, classes, batch, side = PRESETS[name]
    config = load_config(ROOT / "configs/tiny/unimatch.yaml", overrides + ["train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(config, classes).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        export_model(model, path, "onnx", side, log=lambda line: print(f"- {name}: {line}"))
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    predictor = Predictor(model, classes)
    images = torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    feed = {"images": images.numpy()}
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    calls = {"torch": lambda: predictor.scores(images), "onnxruntime": lambda: session.run(["logits"], feed)}
    for step in range(args.warmup + args.repeat):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            if step >= args.warmup:
                times[key].append(time.perf_counter() - start)
    t, o = median(times["torch"]), median(times["onnxruntime"])
    return [[name, f"{batch} x {side}x{side}", t, batch / t, o, batch / o, t / o]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and of onnxruntime")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("Predict throughput: eager torch vs onnxruntime (CPU)")
    rows = []
    for name in args.presets:
        rows += run(name, args)
    print()
    table(["model", "batch", "torch s/batch", "torch images/s", "onnxruntime s/batch", "onnxruntime images/s",
           "onnxruntime speed-up"], rows)
    footer()


if __name__ == "__main__":
    sys.exit(main())
