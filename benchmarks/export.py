"""Seconds per phase of ``hafis export`` on the demo's network, and the same with torch's other ONNX exporter.

    python benchmarks/export.py                        # hafis export, 2 threads
    python benchmarks/export.py --exporters torchscript dynamo

The network is ``make demo``'s (``src/hafis/demo/configs/garments_quick.yaml``: DeepLabV3+ on EfficientNet-Lite0,
decoder 128, 6 classes, 4.6M parameters), randomly initialised (the time does not depend on the weights) and saved as
a checkpoint first. Phases: ``load`` = config and checkpoint (:func:`hafis.engine.inference.load_trained_model`),
``export`` = trace and write the ONNX file, ``session`` = onnxruntime loads it, ``parity`` = eager torch and
onnxruntime on the two check sizes. ``torchscript`` is what ``hafis export`` runs (:func:`export_model`);
``dynamo`` is the ``torch.export``-based exporter it used before, timed as ``torch.export`` and ``ONNX
translation`` (its ``export`` is their sum), with the same session and parity steps. ``command`` is the wall time
of the whole ``python -m hafis export`` process (interpreter and imports included), run ``--repeat`` times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
from _common import footer, header, median, table  # noqa: E402

from hafis.config import load_config, to_dict  # noqa: E402
from hafis.engine import export  # noqa: E402
from hafis.engine.build import build_model  # noqa: E402
from hafis.engine.inference import load_trained_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "src/hafis/demo/configs/garments_quick.yaml"
#: the demo's network without its ImageNet weights (random initialisation), so no package is needed
OVERRIDES = ["model.pretrained=null", "train.device=cpu"]
CLASSES = 6


def _dynamo(graph, path: Path, step: int, seconds: dict) -> None:
    """The exporter ``hafis export`` used before: ``torch.export`` with dynamic sides, then its ONNX translation."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    if step == 1:
        sides = {2: Dim("height", min=32, max=16384), 3: Dim("width", min=32, max=16384)}
    else:
        sides = {2: step * Dim("height_steps", min=2, max=16384 // step),
                 3: step * Dim("width_steps", min=2, max=16384 // step)}
    example = torch.zeros((2, 3, *export.trace_size(step, [])), dtype=torch.uint8)
    start = time.perf_counter()
    program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch, **sides},))
    seconds["torch.export"] = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, f=str(path), input_names=["images"], output_names=["logits"],
                          opset_version=export.OPSET, dynamo=True, external_data=False, verbose=False)
    seconds["ONNX translation"] = time.perf_counter() - start - seconds["torch.export"]
    seconds["export"] = seconds["torch.export"] + seconds["ONNX translation"]


def run(exporter: str, config_path: Path, checkpoint: Path, tmp: Path) -> dict:
    seconds: dict = {}
    start = time.perf_counter()
    config = load_config(config_path, OVERRIDES)
    model, _, _ = load_trained_model(config, checkpoint)
    seconds["load"] = time.perf_counter() - start
    out = tmp / f"{exporter}.onnx"
    if exporter == "torchscript":
        report = export.export_model(model, out, "onnx", config.data.crop_size, log=None)
        seconds.update(report.seconds)
        worst = max(r.max_diff for r in report.parity)
    else:
        graph = export.InferenceGraph(model)
        step = export.size_step(model)
        _dynamo(graph, out, step, seconds)
        start = time.perf_counter()
        session = export.onnx_runner(out)
        seconds["session"] = time.perf_counter() - start
        start = time.perf_counter()
        worst = max(r.max_diff for r in export.parity(graph, session, export.check_sizes(step, config.data.crop_size)))
        seconds["parity"] = time.perf_counter() - start
    seconds["total"] = sum(seconds[k] for k in ("load", "export", "session", "parity"))
    seconds["max |logit difference|"] = worst
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporters", nargs="+", choices=("torchscript", "dynamo"), default=["torchscript"])
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole command (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("hafis export of the demo's network: seconds per phase (CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = load_config(DEMO_CONFIG, OVERRIDES)
        torch.manual_seed(0)
        model = build_model(config, CLASSES)
        checkpoint = tmp / "demo.pt"
        torch.save({"model": model.state_dict(), "iteration": 0, "config": to_dict(config)}, checkpoint)
        print(f"- network: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{config.model.backbone} DeepLabV3+, {CLASSES} classes; check sizes "
              f"{export.check_sizes(export.size_step(model), config.data.crop_size)}\n", flush=True)
        phases = ["load", "torch.export", "ONNX translation", "export", "session", "parity", "total"]
        rows = []
        for exporter in args.exporters:
            seconds = run(exporter, DEMO_CONFIG, checkpoint, tmp)
            rows.append([exporter, *[seconds.get(p, "-") for p in phases], f"{seconds['max |logit difference|']:.2g}"])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        walls = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hafis", "export", str(DEMO_CONFIG), *OVERRIDES, "--checkpoint",
                            str(checkpoint), "--out", str(tmp / "command.onnx")], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - start)
    table(["exporter", *[f"{p} s" for p in phases], "max logit diff"], rows)
    print(f"\n`python -m hafis export` (whole process, {args.threads} threads): {median(walls):.1f} s "
          f"(median of {len(walls)})")
    footer()


if __name__ == "__main__":
    sys.exit(main())
