"""The demo's runs: supervised vs UniMatch vs UniMatch + the weighting, on the garments (Fashion-MNIST on real
photographs, with an ImageNet-pretrained encoder) or, where Fashion-MNIST is not installed, the built-in synthetic
scenes.

Every run uses the same labelled subset, seed and schedule; only the framework and the weighting keys change. The
report gives the final and best mIoU of each run, per-class IoU, pseudo-label quality against the (hidden) ground
truth of unlabelled images over training, and pictures of pseudo-labels, reliable masks and weight maps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from hafis.config import load_config
from hafis.engine.diagnostics import load_images, pseudo_label_quality
from hafis.engine.trainer import Trainer
from hafis.engine.visualize import inspect, save_grid
from hafis.files import atomic_write

from .detector import DETECTOR_RUN, needs_detector, plot_detections, prepare_detector, probe_box_masks
from .report import NUM_PROBE_IMAGES, RunRecord, detector_report_lines, plot_curves, write_report

CONFIG_DIR = Path(__file__).parent / "configs"

#: (label, overrides) of the runs; the full demo adds the authors'-code form of the weight.
RUNS = [
    ("supervised", ["train.framework=supervised"]),
    ("unimatch", ["train.framework=unimatch"]),
    ("unimatch + W (paper: s/k, count)", ["train.framework=unimatch", "weighting.enabled=true"]),
]
AUTHORS_RUN = ("unimatch + W (authors' code: 1+s/k, weight)",
               ["train.framework=unimatch", "weighting.enabled=true", "weighting.offset=1",
                "weighting.normalize=weight"])
W_LABEL = " + W (paper: s/k, count)"


def framework_runs(frameworks: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``hafis demo --frameworks a,b``: supervised, then each framework without and with the weighting."""
    runs = [RUNS[0]]
    for name in frameworks:
        runs += [(name, [f"train.framework={name}"]),
                 (name + W_LABEL, [f"train.framework={name}", "weighting.enabled=true"])]
    return runs


DATA_CHOICES = ("auto", "garments", "synthetic")


def demo_data(data: str, log=print) -> str:
    """``auto``: the garments when Fashion-MNIST is installed, else the synthetic scenes (saying how to get it)."""
    if data != "auto":
        return data
    from hafis.data.base import DataError
    from hafis.data.garments import GarmentsConfig, find_fashion_mnist

    try:
        find_fashion_mnist(GarmentsConfig())
        return "garments"
    except DataError as exc:
        log(f"[demo] {exc}. The demo runs on the built-in synthetic scenes instead.")
        return "synthetic"


def demo_config_path(quick: bool, data: str = "synthetic") -> Path:
    name = "garments" if data == "garments" else "demo"
    return CONFIG_DIR / (f"{name}_quick.yaml" if quick else f"{name}.yaml")


def run_demo(out: Path, quick: bool = False, overrides: Sequence[str] = (), log=print,
             frameworks: Optional[Sequence[str]] = None, data: str = "auto") -> list[RunRecord]:
    """The default demo, or with ``frameworks`` supervised plus each framework with and without the weighting;
    ``data``: garments, synthetic or auto (:func:`demo_data`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_data(data, log)
    if frameworks:
        runs = framework_runs(frameworks)
    elif quick or data == "garments":
        runs = list(RUNS)  # the garments' full demo keeps to these three to stay near 10 minutes on 2 cores
    else:
        runs = RUNS + [AUTHORS_RUN, DETECTOR_RUN]  # the synthetic scenes are cheap enough for both extra forms
    config_path = demo_config_path(quick, data)
    records, last_trainer = [], None
    detector_info, detector_trainer = None, None
    t_all = time.perf_counter()
    for i, (label, run_overrides) in enumerate(runs):
        config = load_config(config_path, [*run_overrides, f"name=run{i}", f"output_dir={out / 'runs'}/{{name}}",
                                           f"detector.output_dir={out / 'detector'}", *overrides])
        record = RunRecord(label)
        probe: dict = {}

        def on_eval(trainer, iteration, result, record=record, probe=probe):
            if not probe:
                n = min(NUM_PROBE_IMAGES, len(trainer.unlabelled_source))
                probe["images"], probe["gt"] = load_images(trainer.unlabelled_source, range(n))
                probe["boxes"] = probe_box_masks(trainer, n)
            record.iterations.append(iteration)
            record.miou.append(result.miou)
            record.quality.append(pseudo_label_quality(trainer.framework, probe["images"], probe["gt"],
                                                       box_masks=probe["boxes"]))

        log(f"[demo] run {i + 1}/{len(runs)}: {label}")
        if needs_detector(config):
            detector_info = prepare_detector(config, log)
        t0 = time.perf_counter()
        trainer = Trainer(config, on_eval=on_eval)
        if needs_detector(config):
            detector_trainer = trainer
        result = trainer.train()
        record.seconds = time.perf_counter() - t0
        record.final_iou, record.best_miou = result.iou, trainer.best_miou
        records.append(record)
        if config.weighting.enabled and last_trainer is None:
            last_trainer = trainer  # the paper-form weighting run gives the pictures
        log(f"[demo]   mIoU {100 * result.miou:.2f} (best {100 * trainer.best_miou:.2f}) in {record.seconds:.0f} s")
    class_names = list(trainer.class_names)
    plot_curves(records, out / "miou.png", out / "pseudo_labels_quality.png")
    if last_trainer is not None:
        plot_pseudo_labels(last_trainer, out / "pseudo_labels.png")
    if detector_trainer is not None:
        plot_detections(detector_trainer, out / "detections.png")
    report = write_report(out / "report.md", records, class_names, quick, time.perf_counter() - t_all, config_path,
                          frameworks)
    if detector_info is not None:
        report += "\n".join(detector_report_lines(detector_info, records))
        atomic_write(out / "report.md", report)
    log(report)
    return records


def plot_pseudo_labels(trainer: Trainer, path: Path, count: int = 4) -> None:
    """Image, hidden ground truth, pseudo-label, confidence, reliable mask and weight map of unlabelled images."""
    rows = inspect(trainer, trainer.unlabelled_source, range(count), use_boxes=True)
    offset = trainer.config.weighting.offset
    save_grid(rows, path, (offset, offset + 1), gt_title="ground truth (hidden)")
