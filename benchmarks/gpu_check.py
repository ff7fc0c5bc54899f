"""The parts of ``benchmarks/gpu_check.sh``: what one lent GPU can tell in eight minutes.

    benchmarks/gpu_check.sh               # on a CUDA machine: every part, report under $OUT
    benchmarks/gpu_check.sh --dry         # the same script on CPU at tiny sizes (what the test runs)
    python benchmarks/gpu_check.py run steps --work DIR [--dry] [--budget S]   # one part (the script calls these)
    python benchmarks/gpu_check.py report --work DIR --out OUT                  # report.md + gpu_check.json

Each part writes ``WORK/<part>.json`` after every row, so a part stopped by its timeout keeps the rows it finished;
``--budget`` (the script passes the part's timeout) makes a part skip the rows it no longer has time for, saying so.
Parts, in the order the script runs them:

- ``env``: the machine (GPU, compute capability, driver, CPU model and flags, torch, onnxruntime's providers) and
  what ``train.amp: auto`` resolves to on its GPU and its CPU;
- ``cuda_tests``: the tests marked ``@pytest.mark.cuda`` (``pytest -m cuda`` on the test files that have them);
- ``drift``: the tiny UniMatch + weighting run (``configs/tiny/unimatch.yaml``, ``weighting.reliable:
  confidence``) for 200 iterations on the CPU, on CUDA twice (run-to-run determinism) and on CUDA in bf16, float32
  elsewhere: loss and mIoU differences, largest weight difference;
- ``steps``: one UniMatch step of DeepLabV3+ on the deep-stem ResNet-101 (``configs/voc/unimatch.yaml`` at crop 513,
  8 labelled + 8 unlabelled images, 21 classes; random initialisation, synthetic batches of the right shapes) in
  float32, bf16, bf16 + channels-last, weighting off and on (``benchmarks/step.py``'s harness: the paper's detector
  rule, bank prefilled); on running out of memory the batch is halved and the row says so;
- ``v2``: the UniMatch V2 step (DINOv2-S / -B + DPT) at crop 518 (``configs/voc/unimatch_v2.yaml``) and 798
  (``configs/cityscapes/unimatch_v2.yaml``): the release's per-GPU batch (4+4 at 518, 2+2 at 798) in bf16, its
  global batch on this one GPU (16+16, 8+8; halved until it fits), then float32 at the per-GPU batch;
- ``loaders``: the trainer's labelled and unlabelled streams (the unlabelled one with UniMatch's second, mixed-in
  batch) at crop 513 on a VOC-layout tree of JPEG images and PNG masks written here, with 0 to 16 workers per
  loader, beside the step rate of ``steps``;
- ``predict``: ``hafis predict`` on a folder of JPEGs with a random-initialised R101 checkpoint (images per second,
  files read and masks written included), the forward pass alone, and onnxruntime's CUDA provider where installed;
- ``compile``: the ``steps`` row bf16 + channels-last with the segmenter ``torch.compile``'d (its compile time is the
  warm-up column).

``--dry`` runs every part on the CPU at tiny sizes (the tiny ResNet at 32 px, ``dinov2_tiny`` at 28 px, 64 px
loader crops, the ``aot_eager`` compile backend), the CPU standing in for CUDA in ``drift``: it proves the script,
not the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "cuda_tests", "drift", "steps", "v2", "loaders", "predict", "compile")
TITLES = {"env": "Machine", "cuda_tests": "CUDA tests", "drift": "Drift: CUDA vs CPU, and CUDA run to run",
          "steps": "UniMatch step, DeepLabV3+ R101, crop 513, 8 + 8", "v2": "UniMatch V2 step, DINOv2 + DPT",
          "loaders": "Loaders at crop 513 vs the step", "predict": "Predict throughput",
          "compile": "UniMatch step with torch.compile"}


# ------------------------------------------------------------------------------------------------ sizes
def sizes(dry: bool) -> SimpleNamespace:
    """What each part measures: the paper's shapes on a GPU, tiny ones for ``--dry``."""
    if dry:
        return SimpleNamespace(
            device="cpu", drift_iterations=6, drift_eval=3, drift_log=1,
            step_preset=("tiny", ROOT / "configs/tiny/unimatch.yaml", [], 4, 2),
            step_variants=("fp32", "bf16", "bf16+cl"), steps=1, warmup=1, compile_backend="aot_eager",
            v2=[("dinov2_tiny", 16, 28, ROOT / "configs/tiny/unimatch_v2.yaml", 4, 1, 2)],
            loader_crop=64, loader_image=(80, 60), loader_images=(8, 8), loader_batch=2, loader_workers=(0, 1),
            loader_seconds=0.3, predict_images=4, predict_batch=2)
    return SimpleNamespace(
        device="cuda", drift_iterations=200, drift_eval=50, drift_log=10,
        step_preset=("voc-r101-513", ROOT / "configs/voc/unimatch.yaml", ["data.crop_size=513"], 21, 8),
        step_variants=("fp32", "bf16", "bf16+cl"), steps=8, warmup=1, compile_backend="inductor",
        # encoder, DPT features, crop, config, classes, release batch per GPU (of 4 GPUs), global batch
        v2=[("dinov2_small", 64, 518, ROOT / "configs/voc/unimatch_v2.yaml", 21, 4, 16),
            ("dinov2_base", 128, 518, ROOT / "configs/voc/unimatch_v2.yaml", 21, 4, 16),
            ("dinov2_small", 64, 798, ROOT / "configs/cityscapes/unimatch_v2.yaml", 19, 2, 8),
            ("dinov2_base", 128, 798, ROOT / "configs/cityscapes/unimatch_v2.yaml", 19, 2, 8)],
        loader_crop=513, loader_image=(500, 375), loader_images=(48, 48), loader_batch=8,
        loader_workers=(0, 2, 4, 8, 16), loader_seconds=2.5, predict_images=32, predict_batch=8)


# ------------------------------------------------------------------------------------------------ records
class Part:
    """One part's record, ``WORK/<name>.json``, rewritten after every row."""

    def __init__(self, work: Path, name: str, dry: bool, budget: Optional[float]) -> None:
        self.path = work / f"{name}.json"
        self.start, self.budget = time.monotonic(), budget
        self.data = {"part": name, "dry": dry, "rows": [], "notes": [], "summary": ""}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def row(self, **row) -> dict:
        self.data["rows"].append(row)
        self.save()
        print(f"[{self.data['part']}] " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items()), flush=True)
        return row

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()
        print(f"[{self.data['part']}] {text}", flush=True)

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.save()

    def left(self) -> float:
        """Seconds left of the part's budget (its timeout less a margin for writing up); inf without one."""
        if self.budget is None:
            return float("inf")
        return self.budget - 5 - (time.monotonic() - self.start)

    def has_time(self, needed: float, what: str) -> bool:
        if self.left() >= needed:
            return True
        self.note(f"skipped {what}: {self.left():.0f} s of the part's budget left, about {needed:.0f} s needed")
        return False


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if value == 0:
            return "0"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ helpers
def _torch():
    import torch

    return torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        _torch().cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        _torch().cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    torch = _torch()
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def _load_part(work: Path, name: str) -> Optional[dict]:
    try:
        return json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _cpu_model_and_flags() -> tuple[str, list]:
    model, flags = platform.processor() or "?", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        model = found.group(1).strip() if found else model
        found = re.search(r"(?:flags|Features)\s*:\s*(.+)", text)
        flags = found.group(1).split() if found else []
    except OSError:
        pass
    return model, flags


# ------------------------------------------------------------------------------------------------ parts
def part_env(p: Part, s: SimpleNamespace, work: Path) -> None:
    torch = _torch()
    from hafis.precision import resolve_amp

    cpu, flags = _cpu_model_and_flags()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    p.row(item="CPU", value=f"{cpu}, {os.cpu_count()} logical cores; flags: {' '.join(wanted) or '-'}")
    p.row(item="load average", value=" / ".join(f"{x:.2f}" for x in os.getloadavg()))
    p.row(item="Python, torch", value=f"{platform.python_version()}, torch {torch.__version__} (CUDA "
                                      f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; TF32 in "
                                      f"matmuls {torch.backends.cuda.matmul.allow_tf32}, in cuDNN "
                                      f"{torch.backends.cudnn.allow_tf32}; cudnn.benchmark "
                                      f"{torch.backends.cudnn.benchmark})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        p.row(item="GPU", value=f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                f"{props.major}.{props.minor}, {props.multi_processor_count} SMs")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            p.row(item="driver, max SM clock, power limit", value=smi.strip() or "-")
        except (OSError, subprocess.TimeoutExpired):
            pass
        p.row(item="train.amp: auto on the GPU", value="{} ({})".format(*resolve_amp("auto", "cuda")))
    else:
        p.row(item="GPU", value="none: torch sees no CUDA device" + (" (--dry)" if p.data["dry"] else ""))
    p.row(item="train.amp: auto on the CPU", value="{} ({})".format(*resolve_amp("auto", "cpu")))
    try:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        p.row(item="onnxruntime", value=f"{onnxruntime.__version__}: {providers}")
    except ImportError:
        p.row(item="onnxruntime", value="not installed")
    versions = []
    for name in ("torchvision", "timm", "numpy", "PIL", "onnx"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} -")
    p.row(item="packages", value=", ".join(versions))
    gpu = next((r["value"] for r in p.data["rows"] if r["item"] == "GPU"), "-")
    p.summary(f"{gpu.split(',')[0]}; amp auto: GPU "
              f"{resolve_amp('auto', 'cuda')[0] if torch.cuda.is_available() else '-'}, CPU "
              f"{resolve_amp('auto', 'cpu')[0]}")


def part_cuda_tests(p: Part, s: SimpleNamespace, work: Path) -> None:
    import xml.etree.ElementTree as ET

    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                   if "mark.cuda" in f.read_text())
    p.note(f"test files with @pytest.mark.cuda: {', '.join(files)}")
    report = work / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
               *files]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(10.0, p.left()) if p.budget else None)
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            counts[outcome] += 1
            message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
            p.row(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                  seconds=float(case.get("time", 0)), message=message[:200])
    p.summary(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped (pytest exit "
              f"{done.returncode})")
    if done.returncode not in (0, 5) or counts["failed"]:
        raise SystemExit(1)


def part_drift(p: Part, s: SimpleNamespace, work: Path) -> None:
    torch = _torch()
    from hafis.config import load_config
    from hafis.engine.run_log import read_metrics
    from hafis.engine.trainer import Trainer

    other = "cpu" if p.data["dry"] else "cuda"
    if p.data["dry"]:
        p.note("--dry: the CPU stands in for CUDA")
    runs = [("cpu", "cpu", "off"), (other, f"{other} (1)", "off"), (other, f"{other} (2)", "off"),
            (other, f"{other} bf16", "bf16")]
    found: dict = {}
    for device, label, amp in runs:
        if found and not p.has_time(1.3 * max(r["seconds"] for r in found.values()), f"the {label} run"):
            continue
        out = work / "drift" / re.sub(r"\W+", "_", label)
        shutil.rmtree(out, ignore_errors=True)
        config = load_config(ROOT / "configs/tiny/unimatch.yaml", [
            "weighting.enabled=true", "weighting.reliable=confidence", f"train.iterations={s.drift_iterations}",
            f"train.eval_interval={s.drift_eval}", f"train.log_interval={s.drift_log}", f"train.device={device}",
            f"train.amp={amp}", "train.tensorboard=false", "train.progress_bar=false", f"output_dir={out}"])
        start = time.perf_counter()
        trainer = Trainer(config)
        result = trainer.train()
        _sync(device)
        seconds = time.perf_counter() - start
        records = read_metrics(out / "metrics.jsonl")
        losses = [r["loss"] for r in records if "loss" in r]
        evals = [r["miou"] for r in records if r.get("event") == "eval"]
        params = torch.cat([v.detach().float().flatten().cpu() for v in trainer.model.state_dict().values()
                            if v.is_floating_point()])
        found[label] = {"seconds": seconds, "losses": losses, "evals": evals, "params": params, "miou": result.miou}
        row = {"run": label, "amp": amp, "seconds": seconds, "it/s": s.drift_iterations / seconds,
               "final loss": losses[-1], "final mIoU %": 100 * result.miou}
        ref = found.get("cpu") if label != "cpu" else None
        if ref is not None:
            row["max loss diff vs CPU"] = max(abs(a - b) for a, b in zip(losses, ref["losses"], strict=True))
            row["max mIoU diff vs CPU (pts)"] = 100 * max(abs(a - b) for a, b in zip(evals, ref["evals"], strict=True))
            row["max weight diff vs CPU"] = float((params - ref["params"]).abs().max())
        p.row(**row)
        del trainer
        _free(device)
    first, second = found.get(f"{other} (1)"), found.get(f"{other} (2)")
    if first and second:
        same = first["losses"] == second["losses"] and torch.equal(first["params"], second["params"])
        diff = float((first["params"] - second["params"]).abs().max())
        p.row(run=f"{other} (1) vs {other} (2)", amp="off", **{
            "losses identical": first["losses"] == second["losses"],
            "weights identical": torch.equal(first["params"], second["params"]),
            "max weight diff": diff})
        cpu = found["cpu"]
        p.summary(f"{other} vs CPU after {s.drift_iterations} it: max |loss diff| "
                  f"{max(abs(a - b) for a, b in zip(first['losses'], cpu['losses'], strict=True)):.3g}, final mIoU "
                  f"{100 * first['miou']:.1f} vs {100 * cpu['miou']:.1f}; run to run "
                  f"{'bit-identical' if same else f'differs (max weight diff {diff:.3g})'}")


def _step_args(s: SimpleNamespace, steps: int, warmup: int) -> SimpleNamespace:
    return SimpleNamespace(device=s.device, reliable="detector", align="bilinear", crop=None, steps=steps,
                           warmup=warmup, compare_mask=False, compile_backend=s.compile_backend)


def _measure_step(p: Part, name: str, config: Path, overrides: list, classes: int, batch: int, variant: str,
                  s: SimpleNamespace, steps: int, warmup: int, smallest: int = 1, **extra) -> Optional[dict]:
    """One ``step.py`` measurement (weighting off and on) at ``batch`` + ``batch``, halved on out-of-memory down to
    ``smallest``; the row names the batch measured and the ones that did not fit."""
    import step

    args, did_not_fit = _step_args(s, steps, warmup), []
    while batch >= smallest:
        step.PRESETS[name] = (config, [*overrides, f"train.batch_size={batch}", f"train.unlabelled_batch_size={batch}"],
                              classes)
        start = time.perf_counter()
        try:
            row, _ = step.run_variant(name, variant, args)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            row = None
        _free(s.device)  # after the except block: its traceback held the step's tensors
        if row is None:
            did_not_fit.append(f"{batch}+{batch}")
            batch //= 2
            continue
        off_ms, on_ms = row[2], row[3]
        return p.row(**extra, variant=variant, batch=f"{batch}+{batch}", **{
            "off ms": off_ms, "on ms": on_ms, "W share %": 100 * (on_ms - off_ms) / on_ms,
            "W parts ms": row[8], "peak MiB off": row[12], "peak MiB on": row[13], "it/s off": row[10],
            "warm-up s": row[14], "did not fit": ", ".join(did_not_fit) or "-",
            "seconds": time.perf_counter() - start})
    p.row(**extra, variant=variant, batch="-", **{"did not fit": ", ".join(did_not_fit)})
    return None


def part_steps(p: Part, s: SimpleNamespace, work: Path) -> None:
    name, config, overrides, classes, batch = s.step_preset
    last = 0.0
    for variant in s.step_variants:
        if last and not p.has_time(1.5 * last, f"{variant}"):
            continue
        row = _measure_step(p, name, config, overrides, classes, batch, variant, s, s.steps, s.warmup,
                            smallest=max(1, batch // 4))
        last = row["seconds"] if row else last
    rows = [r for r in p.data["rows"] if r.get("off ms")]
    if rows:
        fastest = min(rows, key=lambda r: r["off ms"])
        p.summary(", ".join(f"{r['variant']} {r['off ms']:,.0f} ms ({r['peak MiB off'] / 1024:.1f} GiB)"
                            for r in rows) + f"; W {fastest['W share %']:+.1f} % of the {fastest['variant']} step")


def part_compile(p: Part, s: SimpleNamespace, work: Path) -> None:
    name, config, overrides, classes, batch = s.step_preset
    steps = _load_part(work, "steps") or {}
    fitted = [r["batch"] for r in steps.get("rows", []) if r.get("variant") == "bf16+cl" and r.get("off ms")]
    if fitted:  # the batch the uncompiled row could run
        batch = int(fitted[0].split("+")[0])
    row = _measure_step(p, name, config, overrides, classes, batch, "bf16+cl+compile", s, max(2, s.steps - 2),
                        s.warmup, smallest=batch)
    if row:
        base = next((r for r in steps.get("rows", []) if r.get("variant") == "bf16+cl" and r.get("off ms")), None)
        ratio = f", {row['off ms'] / base['off ms']:.2f}x the bf16+cl step" if base else ""
        p.summary(f"{row['off ms']:,.0f} ms off / {row['on ms']:,.0f} ms on{ratio}; warm-up (compiling) "
                  f"{row['warm-up s']:.0f} s")


def part_v2(p: Part, s: SimpleNamespace, work: Path) -> None:
    # the release's per-GPU batch in bf16 for every encoder and crop first, then its global batch, then float32
    plan = [(spec, spec[5], "bf16", f"release per GPU ({spec[5]}+{spec[5]} x 4 GPUs)") for spec in s.v2]
    plan += [(spec, spec[6], "bf16", f"release global batch on one GPU (largest that fits, from {spec[6]}+{spec[6]})")
             for spec in s.v2]
    plan += [(spec, spec[5], "fp32", "release per GPU, float32") for spec in s.v2]
    seen: dict = {}  # (encoder, crop) -> (seconds, batch) of its last measurement, to tell whether the next fits
    for (encoder, features, crop, config, classes, _, _), batch, variant, what in plan:
        if (encoder, crop) in seen:
            seconds, measured = seen[encoder, crop]
            needed = 1.3 * seconds * max(1.0, batch / measured)
            if not p.has_time(needed, f"{encoder} {crop} {batch}+{batch} {variant}"):
                continue
        overrides = [f"model.backbone={encoder}", f"model.feature_dim={features}", f"data.crop_size={crop}"]
        row = _measure_step(p, f"v2-{encoder}-{crop}", config, overrides, classes, batch, variant, s,
                            max(1, s.steps // 2 - 1), s.warmup, smallest=1 if "global" in what else batch,
                            encoder=encoder, crop=crop, batch_kind=what)
        if row:
            seen[encoder, crop] = (row["seconds"], int(row["batch"].split("+")[0]))
    rows = [r for r in p.data["rows"] if r.get("off ms") and r["batch_kind"].startswith("release per GPU (")]
    p.summary("; ".join(f"{r['encoder'].replace('dinov2_', '')} {r['crop']} {r['batch']}: {r['off ms']:,.0f} ms, "
                        f"{r['peak MiB off'] / 1024:.1f} GiB" for r in rows))


def _write_voc_tree(root: Path, s: SimpleNamespace) -> tuple[list, list]:
    """A VOC2012-layout tree: JPEG images of VOC's size, palette PNG masks of blocky classes with an ignore border
    for the labelled and val images; the unlabelled ones listed in train_aug.txt, without masks."""
    import numpy as np
    from PIL import Image

    from hafis.data.voc import voc_palette

    n_l, n_u = s.loader_images
    labelled = [f"l{i:04d}" for i in range(n_l)]
    unlabelled = [f"u{i:04d}" for i in range(n_u)]
    val = ["v0000", "v0001"]
    done = root / "done"
    if done.is_file():
        return labelled, unlabelled
    w, h = s.loader_image
    rng = np.random.default_rng(0)
    lists = root / "ImageSets" / "Segmentation"
    for folder in (root / "JPEGImages", root / "SegmentationClass", lists):
        folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for k, id in enumerate(labelled + unlabelled + val):
        base = np.stack([(xx * (k + 3)) % 256, (yy * (k + 5)) % 256, (xx + yy) % 256], -1).astype(np.float32)
        image = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)  # photo-like JPEG sizes
        Image.fromarray(image).save(root / "JPEGImages" / f"{id}.jpg", quality=90)
        if not id.startswith("u"):
            blocks = rng.integers(0, 21, (h // 32 + 1, w // 32 + 1)).astype(np.uint8)
            mask = blocks.repeat(32, 0).repeat(32, 1)[:h, :w].copy()
            mask[:3] = 255
            png = Image.fromarray(mask, mode="P")
            png.putpalette(voc_palette())
            png.save(root / "SegmentationClass" / f"{id}.png")
    (lists / "train.txt").write_text("\n".join(labelled) + "\n")
    (lists / "train_aug.txt").write_text("\n".join(labelled + unlabelled) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    done.write_text("")
    return labelled, unlabelled


def _step_rate(work: Path) -> Optional[tuple[float, str]]:
    """Steps per second of the fastest uncompiled ``steps`` row and what it was."""
    steps = _load_part(work, "steps") or {}
    rows = [r for r in steps.get("rows", []) if r.get("it/s off")]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["it/s off"])
    return best["it/s off"], f"{best['variant']} {best['batch']}"


def part_loaders(p: Part, s: SimpleNamespace, work: Path) -> None:
    from hafis.config import load_config
    from hafis.engine.trainer import Trainer

    start = time.perf_counter()
    tree = work / "voc" / "VOC2012"
    _write_voc_tree(tree, s)
    p.note(f"wrote {sum(s.loader_images) + 2} JPEG images of {s.loader_image[0]}x{s.loader_image[1]} and their PNG "
           f"masks in {time.perf_counter() - start:.1f} s")
    rate = _step_rate(work)
    if rate is None:
        p.note("no step rate: the steps part has no row")
    b = s.loader_batch
    last = 0.0
    for workers in s.loader_workers:
        if last and not p.has_time(1.5 * last, f"{workers} workers"):
            continue
        began = time.perf_counter()
        config = load_config(ROOT / "configs/voc/unimatch.yaml", [
            f"data.root={tree}", f"data.crop_size={s.loader_crop}", f"data.num_workers={workers}",
            f"train.batch_size={b}", f"train.unlabelled_batch_size={b}", "model.backbone=resnet_tiny",
            "model.pretrained=null", "model.feature_dim=32", f"train.device={s.device}", "train.sync_bn=false",
            f"output_dir={work / 'loaders_run'}"])
        trainer = Trainer(config)
        labelled, unlabelled = trainer._streams()
        t0 = time.perf_counter()
        next(labelled), next(unlabelled)  # worker start-up and the first batches
        first = time.perf_counter() - t0
        waits = {"labelled": 0.0, "unlabelled": 0.0}
        pairs, t0 = 0, time.perf_counter()
        while pairs < 3 or time.perf_counter() - t0 < s.loader_seconds:
            for name, stream in (("labelled", labelled), ("unlabelled", unlabelled)):
                w0 = time.perf_counter()
                batch = next(stream)
                _sync(s.device)
                waits[name] += time.perf_counter() - w0
            pairs += 1
        elapsed = time.perf_counter() - t0
        del batch
        labelled = unlabelled = trainer = None
        gc.collect()
        per_s = pairs / elapsed
        row = {"workers per loader": workers, "processes": 3 * workers, "first batches s": first,
               "batch pairs/s": per_s, "labelled samples/s": per_s * b, "unlabelled samples/s": per_s * 2 * b,
               "labelled wait %": 100 * waits["labelled"] / elapsed,
               "unlabelled wait %": 100 * waits["unlabelled"] / elapsed}
        if rate:
            row["step it/s"] = rate[0]
            row["feeds the step"] = "yes" if per_s >= rate[0] else f"no ({per_s / rate[0]:.2f}x)"
        p.row(**row)
        last = time.perf_counter() - began
    if rate:
        p.note(f"step rate: {rate[0]:.2f} it/s, the fastest steps row ({rate[1]}, weighting off); a step takes "
               f"{b} labelled and {2 * b} unlabelled samples (UniMatch mixes in a second unlabelled batch)")
    rows = p.data["rows"]
    if rows:
        best = max(rows, key=lambda r: r["batch pairs/s"])
        p.summary(f"best {best['batch pairs/s']:.2f} batch pairs/s with {best['workers per loader']} workers per "
                  f"loader" + (f" vs the step's {rate[0]:.2f} it/s: "
                               f"{'enough' if best['batch pairs/s'] >= rate[0] else 'not enough'}" if rate else ""))


def part_predict(p: Part, s: SimpleNamespace, work: Path) -> None:
    torch = _torch()
    import yaml

    from hafis.cli import main as hafis
    from hafis.config import load_config, to_dict
    from hafis.engine.build import build_model
    from hafis.engine.inference import Predictor

    tree = work / "voc" / "VOC2012"
    _write_voc_tree(tree, s)
    images = work / "predict_images"
    images.mkdir(exist_ok=True)
    for path in sorted((tree / "JPEGImages").glob("u*.jpg"))[: s.predict_images]:
        shutil.copy(path, images / path.name)
    n = len(list(images.glob("*.jpg")))
    if p.data["dry"]:
        base, overrides, classes = ROOT / "configs/tiny/unimatch.yaml", [], 4
    else:
        base, overrides, classes = ROOT / "configs/voc/unimatch.yaml", [f"data.root={tree}"], 21
    config = load_config(base, [*overrides, "model.pretrained=null", f"train.device={s.device}"])
    config_path = work / "predict_config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    torch.manual_seed(0)
    model = build_model(config, classes).eval()
    checkpoint = work / "predict_ckpt.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(config), "iteration": 0}, checkpoint)
    model_name = f"{config.model.name} {config.model.backbone}"

    def cli(out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        code = hafis(["predict", str(config_path), str(images), "--checkpoint", str(checkpoint), "--out", str(out),
                      "--device", s.device, "--batch-size", str(s.predict_batch)])
        if code != 0:
            raise SystemExit(f"hafis predict exited {code}")
        return time.perf_counter() - start

    cli(work / "predict_warm")  # first call: cuDNN's algorithm choice, allocator warm-up
    seconds = cli(work / "predict_out")
    w, h = s.loader_image
    p.row(what="hafis predict", input=f"{model_name}, {n} JPEGs {w}x{h}, --batch-size {s.predict_batch}",
          **{"images/s": n / seconds, "seconds": seconds, "note": "model load, JPEG reads and PNG writes included"})
    predictor = Predictor(model, classes, device=s.device)
    batch = torch.randint(0, 256, (s.predict_batch, 3, h, w), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    for label, autocast in (("forward only, float32", False), ("forward only, bf16 autocast", True)):
        def forward():
            with torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=autocast):
                predictor.scores(batch)
        forward()
        _sync(s.device)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            forward()
            _sync(s.device)
            times.append(time.perf_counter() - start)
        times.sort()
        p.row(what=f"Predictor.scores, {label}", input=f"{s.predict_batch} x {w}x{h}",
              **{"images/s": s.predict_batch / times[2], "seconds": times[2], "note": "median of 5, uint8 in"})
    _onnx(p, s, model, classes, batch, work)
    rows = p.data["rows"]
    p.summary("; ".join(f"{r['what']}: {r['images/s']:.1f} images/s" for r in rows if r.get("images/s")))


def _onnx(p: Part, s: SimpleNamespace, model, classes: int, batch, work: Path) -> None:
    try:
        import onnxruntime
    except ImportError:
        p.note("onnxruntime is not installed: no ONNX row")
        return
    providers = onnxruntime.get_available_providers()
    provider = "CUDAExecutionProvider"
    if provider not in providers:
        if not p.data["dry"]:
            p.note(f"onnxruntime {onnxruntime.__version__} has no CUDA provider here (providers: "
                   f"{', '.join(providers)}; onnxruntime-gpu brings it): no ONNX row")
            return
        provider = "CPUExecutionProvider"
        p.note("--dry: onnxruntime's CPU provider stands in for its CUDA provider")
    if not p.has_time(60, "the ONNX export and its run"):
        return
    from hafis.engine.export import export_model

    path = work / "predict.onnx"
    start = time.perf_counter()
    export_model(model.cpu(), path, "onnx", batch.shape[-1], log=lambda line: print(f"[predict] {line}"))
    p.note(f"hafis export in {time.perf_counter() - start:.1f} s")
    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    feed = {"images": batch.numpy()}
    session.run(["logits"], feed)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(["logits"], feed)
        times.append(time.perf_counter() - start)
    times.sort()
    p.row(what=f"onnxruntime {provider}", input=f"{batch.shape[0]} x {batch.shape[-1]}x{batch.shape[-2]}",
          **{"images/s": batch.shape[0] / times[2], "seconds": times[2], "note": "median of 5, uint8 in"})


RUNNERS: dict[str, Callable] = {"env": part_env, "cuda_tests": part_cuda_tests, "drift": part_drift,
                                "steps": part_steps, "v2": part_v2, "loaders": part_loaders,
                                "predict": part_predict, "compile": part_compile}


# ------------------------------------------------------------------------------------------------ report
def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(k.replace("|", "/") for k in keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k)).replace("|", "/") for k in keys) + " |" for r in rows]
    return lines + [""]


def status_of(part: Optional[dict], rc: Optional[int]) -> str:
    if rc is None:
        return "not run"
    if rc in (124, 137):
        return "timed out"
    if rc != 0:
        return f"failed (exit {rc})"
    return "ok" if part is not None else "no record"


def summary_line(work: Path, name: str, rc: int, seconds: float) -> str:
    part = _load_part(work, name)
    text = (part or {}).get("summary") or ""
    if not text and part and part["rows"]:
        text = f"{len(part['rows'])} row(s) kept"
    status = status_of(part, rc)
    return f"[gpu_check] {name}: {status} in {seconds:.0f} s" + (f": {text}" if text else "")


def report(work: Path, out: Path, dry: bool) -> None:
    status = json.loads((work / "status.json").read_text()) if (work / "status.json").is_file() else {}
    parts = {}
    lines = ["# GPU check" + (" (--dry: CPU, tiny sizes; the figures prove the script, not the GPU)" if dry else ""),
             "", "`benchmarks/gpu_check.sh` (benchmarks/README.md, *GPU check*, says what each row means).", ""]
    for name in PARTS:
        st = status.get(name)
        part = _load_part(work, name)
        rc = st["rc"] if st else None
        parts[name] = {"status": status_of(part, rc), "seconds": st["seconds"] if st else None,
                       "timeout": st["timeout"] if st else None, **(part or {})}
        lines.append(f"## {TITLES[name]}")
        lines.append("")
        state = parts[name]["status"]
        if st:
            state += f", {st['seconds']:.0f} s of {st['timeout']} s"
        lines.append(f"*{state}*" + (f": {part['summary']}" if part and part.get("summary") else ""))
        lines.append("")
        if part:
            lines += _table(part["rows"])
            lines += [f"- {n}" for n in part["notes"]] + ([""] if part["notes"] else [])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    (out / "gpu_check.json").write_text(json.dumps({"dry": dry, "parts": parts}, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one part")
    run.add_argument("part", choices=PARTS)
    run.add_argument("--work", type=Path, required=True)
    run.add_argument("--dry", action="store_true")
    run.add_argument("--budget", type=float, default=None, help="seconds the part may take (its timeout)")
    line = sub.add_parser("summary", help="the one-line summary of a part that has run")
    line.add_argument("part", choices=PARTS)
    line.add_argument("--work", type=Path, required=True)
    line.add_argument("--rc", type=int, required=True)
    line.add_argument("--seconds", type=float, required=True)
    line.add_argument("--timeout", type=int, required=True)
    rep = sub.add_parser("report", help="report.md and gpu_check.json from the parts' records")
    rep.add_argument("--work", type=Path, required=True)
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--dry", action="store_true")
    args = parser.parse_args()
    if args.command == "summary":
        path = args.work / "status.json"
        status = json.loads(path.read_text()) if path.is_file() else {}
        status[args.part] = {"rc": args.rc, "seconds": args.seconds, "timeout": args.timeout}
        path.write_text(json.dumps(status, indent=1))
        print(summary_line(args.work, args.part, args.rc, args.seconds), flush=True)
        return 0
    if args.command == "report":
        report(args.work, args.out, args.dry)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # step.py, _common.py
    part = Part(args.work, args.part, args.dry, args.budget)
    s = sizes(args.dry)
    if not args.dry:
        torch = _torch()
        if not torch.cuda.is_available() and args.part not in ("env", "cuda_tests"):
            part.note("torch sees no CUDA device: nothing measured (run with --dry to try the script on a CPU)")
            return 1
    print(f"[{args.part}] start" + (" (--dry)" if args.dry else ""), flush=True)
    RUNNERS[args.part](part, s, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
