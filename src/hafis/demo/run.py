"""The demo's comparison: supervised vs UniMatch vs UniMatch + the weighting, one seed, on the garments
(Fashion-MNIST on real photographs, with an ImageNet-pretrained encoder) or, where Fashion-MNIST is not installed,
the built-in synthetic scenes.

It is a ``hafis compare`` run (:mod:`hafis.engine.compare`) with fixed arms: every run uses the same labelled
subset, seed and schedule; only the framework and the weighting keys change; the trainer logs the pseudo-label
diagnostics of a fixed set of unlabelled images at every evaluation. On top of the comparison's report the demo
adds per-class IoU, pseudo-label quality over training, its pictures (pseudo-labels, reliable masks, weight maps,
detections) and the detector's section.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Sequence

from hafis.config import load_config
from hafis.engine.compare.plan import Arm, needs_detector
from hafis.engine.compare.pool import Comparison
from hafis.engine.visualize import inspect, save_grid

from .detector import DETECTOR_RUN, plot_detections, prepare_detector
from .report import NUM_PROBE_IMAGES, RunRecord, demo_report, run_record

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


def demo_runs(quick: bool, data: str, frameworks: Optional[Sequence[str]]) -> list[tuple[str, list[str]]]:
    if frameworks:
        return framework_runs(frameworks)
    if quick or data == "garments":
        return list(RUNS)  # the garments' full demo keeps to these three to stay near 10 minutes on 2 cores
    return RUNS + [AUTHORS_RUN, DETECTOR_RUN]  # the synthetic scenes are cheap enough for both extra forms


def run_demo(out: Path, quick: bool = False, overrides: Sequence[str] = (), log=print,
             frameworks: Optional[Sequence[str]] = None, data: str = "auto") -> list[RunRecord]:
    """The default demo, or with ``frameworks`` supervised plus each framework with and without the weighting;
    ``data``: garments, synthetic or auto (:func:`demo_data`). Returns one record per run (a failed run has no
    evaluation; the report names it and its log)."""
    out = Path(out)
    data = demo_data(data, log)
    config_path = demo_config_path(quick, data)
    arms = [Arm(label, list(run_overrides)) for label, run_overrides in demo_runs(quick, data, frameworks)]
    seed = load_config(config_path, list(overrides)).seed
    common = [f"eval.diagnostics_images={NUM_PROBE_IMAGES}", f"detector.output_dir={out / 'detector'}", *overrides]
    command = shlex.join(["hafis", "demo", *(["--quick"] if quick else []), "--data", data,
                          *(["--frameworks", ",".join(frameworks)] if frameworks else []), "--out", str(out),
                          *overrides])
    comparison = Comparison(config_path, arms, [seed], common, out, None if frameworks else "unimatch", command, log,
                            title=f"hafis demo ({'quick' if quick else 'full'})")
    detector_spec = next((s for s in comparison.specs if needs_detector(s.config)), None)
    # trained here, timed for the report; the comparison's `hafis detect` then reuses it
    detector_info = prepare_detector(detector_spec.config, log) if detector_spec is not None else None
    comparison.run()
    records = [run_record(r) for r in comparison.collect()]
    if all(r.miou for r in records):
        pictures(comparison, out)
        extra = demo_report(records, config_path, frameworks, detector_info)
    else:
        extra = ""
    report = comparison.write_outputs(extra)
    log(report)
    return records


def pictures(comparison: Comparison, out: Path) -> None:
    """The demo's pictures from the trained runs' last checkpoints: pseudo-labels, reliable masks and weight maps of
    the first weighting run (``pseudo_labels.png``), and the detector run's detections (``detections.png``)."""
    from hafis.engine.trainer import Trainer

    weighted = next((s for s in comparison.specs if s.config.weighting.enabled), None)
    if weighted is not None:
        trainer = Trainer(weighted.config)
        trainer.resume()
        rows = inspect(trainer, trainer.unlabelled_source, range(min(4, len(trainer.unlabelled_source))),
                       use_boxes=True)
        offset = weighted.config.weighting.offset
        save_grid(rows, out / "pseudo_labels.png", (offset, offset + 1), gt_title="ground truth (hidden)",
                  class_names=trainer.class_names, dataset=weighted.config.data.dataset)
    detector = next((s for s in comparison.specs if needs_detector(s.config)), None)
    if detector is not None:
        trainer = Trainer(detector.config)
        trainer.resume()
        plot_detections(trainer, out / "detections.png")
