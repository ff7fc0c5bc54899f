"""One UniMatch training step with the weighting on vs off: the overhead ratio and its parts.

    python benchmarks/step.py --preset tiny                 # the tiny CPU config (configs/tiny/unimatch.yaml)
    python benchmarks/step.py --preset r50                  # DeepLabV3+ ResNet-50, 321 crop, batch 2+2, CPU
    python benchmarks/step.py --preset r101 --device cuda --variants fp32 bf16 fp32+cl bf16+cl   # GPU
    python benchmarks/step.py --preset dpt --crop 126 --threads 1   # UniMatch V2 step, DINOv2-S + DPT, batch 4+4, CPU
    python benchmarks/step.py --preset dpt --device cuda --variants fp32 bf16     # the same at crop 518 on a GPU
    python benchmarks/step.py --preset r101 --device cuda --variants bf16+cl+compile  # torch.compile'd segmenter

Both frameworks share one model and one optimiser, and the on and off steps alternate (on/off, then off/on, ...)
on the same preloaded batch, so load drift on a shared machine hits both alike. A step is the framework's
``train_step`` (forward passes, pseudo-labels, bank update, weights, losses), ``backward`` and the SGD step.
The weighting runs as the paper has it: ``weighting.reliable: detector`` with a per-class box mask in the batch
(random boxes here; the trainer reads them from the detection cache), so the detector-mask lookup is part of it.

Reported: median wall time of ``--steps`` steps each way and the overhead ``on / off - 1``, also on process CPU
time (less sensitive to other processes on the machine); iterations per second; peak memory of one step (GPU:
``max_memory_allocated``; CPU: the process's resident memory at the step's peak, ``/proc`` high-water mark reset
before the step); the wall time of the warm-up steps (a compiled variant compiles there); then the parts of the
weighting, each timed alone (median of ``--steps`` calls) on the features and logits of one real forward pass, as a
share of the off step (not for a compiled variant: its forward pass would compile again).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from _common import cuda_peak_mib, footer, header, median, peak_rss, sync, table
from _reference import mask_weights

from hafis.config import load_config
from hafis.data.transforms import cutmix_box
from hafis.engine.build import build_model
from hafis.frameworks import FrameworkContext, build_framework
from hafis.frameworks.mixing import partner_index, paste
from hafis.weighting import labelled_qualify_mask

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    # name: (config file or None, overrides, classes)
    "tiny": (ROOT / "configs/tiny/unimatch.yaml", [], 4),
    "r50": (None, ["model.backbone=resnet50", "data.crop_size=321", "train.batch_size=2",
                   "train.unlabelled_batch_size=2"], 21),
    "r101": (None, ["model.backbone=resnet101", "data.crop_size=513", "train.batch_size=8",
                    "train.unlabelled_batch_size=8"], 21),
    # UniMatch V2 as released on VOC: DINOv2-S + DPT (features 64), crop 518 (--crop for a smaller one on CPU)
    "dpt": (None, ["train.framework=unimatch_v2", "model.name=dpt", "model.backbone=dinov2_small",
                   "model.feature_dim=64", "data.crop_size=518", "train.batch_size=4",
                   "train.unlabelled_batch_size=4"], 21),
}


def make_config(preset: str, enabled: bool, args):
    path, overrides, _ = PRESETS[preset]
    extra = [f"weighting.enabled={str(enabled).lower()}", f"weighting.reliable={args.reliable}",
             f"weighting.align={args.align}", "model.pretrained=null", "model.pretrained_path=null",
             f"train.device={args.device}"] + ([f"data.crop_size={args.crop}"] if args.crop else [])
    return load_config(path, list(overrides) + extra)


def make_batch(cfg, C: int, device, seed: int = 0) -> tuple[dict, dict]:
    """A preloaded batch shaped like the trainer's (blocky labels, CutMix boxes, detector box masks)."""
    g = torch.Generator().manual_seed(seed)
    bl, bu, S = cfg.train.batch_size, cfg.train.unlabelled_batch_size, cfg.data.crop_size
    cell = max(S // 8, 1)

    def blocky(b):
        blocks = torch.randint(0, C, (b, -(-S // cell), -(-S // cell)), generator=g)
        return blocks.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :S, :S].contiguous()

    mask = blocky(bl)
    mask[:, :2] = 255  # a border of ignore, as VOC has
    ignore = torch.zeros(bu, S, S, dtype=torch.long)
    ignore[:, S - S // 10:] = 255  # padding of the weak geometry
    rng = __import__("numpy").random.default_rng(seed)
    boxes = lambda: torch.stack([cutmix_box(S, rng, 1.0).bool() for _ in range(bu)])  # noqa: E731
    box_mask = torch.zeros(bu, C, S, S, dtype=torch.bool)
    for b in range(bu):  # a few random detection boxes per image
        for c in torch.randint(1, C, (4,), generator=g).tolist():
            y0, x0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
            box_mask[b, c, y0:y0 + S // 2, x0:x0 + S // 2] = True
    labelled = {"image": torch.randn(bl, 3, S, S, generator=g), "mask": mask}
    unlabelled = {"weak": torch.randn(bu, 3, S, S, generator=g), "strong1": torch.randn(bu, 3, S, S, generator=g),
                  "strong2": torch.randn(bu, 3, S, S, generator=g), "ignore": ignore, "box1": boxes(),
                  "box2": boxes(), "box_mask": box_mask}
    # the second unlabelled batch UniMatch's CutMix takes its boxes from (unimatch.mix: same_images, as released)
    unlabelled["mix"] = {**{k: torch.randn(bu, 3, S, S, generator=g) for k in ("weak", "strong1", "strong2")},
                         "ignore": ignore.flip(0), "box_mask": box_mask.flip(0)}
    to = lambda d: {k: to(v) if isinstance(v, dict) else v.to(device) for k, v in d.items()}  # noqa: E731
    return to(labelled), to(unlabelled)


def prefill_bank(weighter, C: int, D: int, device) -> None:
    """Every class gets a prototype, as after a few iterations of training."""
    g = torch.Generator().manual_seed(1)
    every = torch.arange(C).repeat_interleave(8)[None, None].expand(1, 1, 8 * C).to(device)
    weighter.update_labelled(torch.relu(torch.randn(1, D, 1, 8 * C, generator=g)).to(device), every)


def run_variant(preset: str, variant: str, args) -> tuple[list, list]:
    device = torch.device(args.device)
    bf16, channels_last, compiled = "bf16" in variant, "cl" in variant.split("+"), "compile" in variant.split("+")
    cfg_on, cfg_off = make_config(preset, True, args), make_config(preset, False, args)
    C = PRESETS[preset][2]
    torch.manual_seed(0)
    model = build_model(cfg_on, C).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:  # in place, as train.compile does
        model.compile(backend=getattr(args, "compile_backend", "inductor"))
    model.train()
    fw_ctx = FrameworkContext(C, thing_classes=tuple(range(1, C)))
    on, off = build_framework(cfg_on, model, fw_ctx).to(device), build_framework(cfg_off, model, fw_ctx).to(device)
    weighter = on.weighting.weighter
    prefill_bank(weighter, C, cfg_on.model.feature_dim, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    labelled, unlabelled = make_batch(cfg_on, C, device)
    if channels_last:
        for d in (labelled, unlabelled):
            for k in ("image", "weak", "strong1", "strong2"):
                if k in d:
                    d[k] = d[k].contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(framework) -> tuple[float, float]:
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast():
            out = framework.train_step(labelled, unlabelled, 0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    peaks = {}
    warm = time.perf_counter()
    for name, fw in (("off", off), ("on", on)):  # warm-up, and the peak memory of one step each
        for _ in range(args.warmup):
            step(fw)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with peak_rss(absolute=True) as peak:
            step(fw)
        peaks[name] = cuda_peak_mib(device) if device.type == "cuda" else peak()
    warm = time.perf_counter() - warm
    times = {"on": [], "off": []}
    for i in range(args.steps):
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            times[name].append(step(on if name == "on" else off))
    wall = {k: median([t[0] for t in v]) for k, v in times.items()}
    cpu = {k: median([t[1] for t in v]) for k, v in times.items()}

    row = [preset, variant, wall["off"] * 1e3, wall["on"] * 1e3, 100 * (wall["on"] / wall["off"] - 1),
           cpu["off"] * 1e3, cpu["on"] * 1e3, 100 * (cpu["on"] / cpu["off"] - 1), None, None,
           1 / wall["off"], 1 / wall["on"], peaks["off"], peaks["on"], warm]
    if compiled:
        return row, []
    # ---- parts, on one real forward pass's features and logits
    with torch.no_grad(), autocast():
        x, y, u_w = labelled["image"], labelled["mask"], unlabelled["weak"]
        out = model(torch.cat([x, u_w]))
        pred_x, pred_w = out.logits.split([x.shape[0], u_w.shape[0]])
        feat_l, feat_w = out.features.split([x.shape[0], u_w.shape[0]])
        conf, pseudo = pred_w.softmax(dim=1).max(dim=1)
    ignore, box_mask = unlabelled["ignore"], unlabelled["box_mask"]
    H, W = pseudo.shape[-2:]
    state = {}

    def masks():
        state["q"] = labelled_qualify_mask(pred_x, y, cfg_on.weighting.labelled_threshold)

    def detector_lookup():
        state["r"] = on.weighting.reliable(conf, pseudo, ignore, box_mask)

    def bank():
        weighter.update_labelled(feat_l, y, state["q"])
        weighter.update_unlabelled(feat_w, pseudo, state["r"])

    def topk():
        state["index"] = weighter.channel_index(feat_w, (H, W))

    def gather():
        s = weighter.similarity_from_index(state["index"], pseudo)
        w = weighter.offset + s.float() / weighter.k
        partner = partner_index(w.shape[0], w.device)
        state["w"] = [paste(w, w[partner], unlabelled[b]) for b in ("box1", "box2")]

    parts = [("labelled mask (softmax > 0.95, right class)", masks),
             ("detector-mask lookup (reliable pixels)", detector_lookup),
             ("bank update (2 pushes)", bank), ("top-k (resize + top-k channels)", topk),
             ("weight gather (+ CutMix of W)", gather)]
    part_rows, total = [], 0.0
    with autocast():
        for name, fn in parts:
            fn()  # warm-up, and the state the next part reads
            t = []
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                t.append(time.perf_counter() - start)
            total += median(t)
            part_rows.append([preset, variant, name, median(t) * 1e3, 100 * median(t) / wall["off"]])
    part_rows.append([preset, variant, "sum of the parts", total * 1e3, 100 * total / wall["off"]])
    if args.compare_mask:  # not part of the step: the exact top-k mask + product form
        with autocast():
            t = [0.0] * args.steps
            mask_weights(weighter, feat_w, pseudo)
            for i in range(args.steps):
                sync(device)
                start = time.perf_counter()
                mask_weights(weighter, feat_w, pseudo)
                sync(device)
                t[i] = time.perf_counter() - start
        part_rows.append([preset, variant, "for comparison: exact top-k mask + product",
                          median(t) * 1e3, 100 * median(t) / wall["off"]])
    row[8:10] = [total * 1e3, 100 * total / wall["off"]]
    return row, part_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "r50"], choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=7, help="timed steps each way (medians)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", nargs="+", default=["fp32"],
                   help="fp32, bf16 (autocast), fp32+cl / bf16+cl (channels-last model and inputs), +compile "
                        "(torch.compile the segmenter, e.g. bf16+cl+compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of a +compile variant")
    p.add_argument("--reliable", default="detector", choices=["detector", "confidence"])
    p.add_argument("--align", default="bilinear", choices=["bilinear", "nearest"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--crop", type=int, default=None, help="crop side instead of the preset's (dpt: a multiple of 14)")
    p.add_argument("--no-compare-mask", dest="compare_mask", action="store_false",
                   help="skip timing the exact top-k mask + product form on the same features")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header("framework step (UniMatch; dpt: UniMatch V2), weighting on vs off")
    print(f"{args.steps} timed steps each way after {args.warmup} warm-up; weighting.reliable={args.reliable}, "
          f"align={args.align}, k=5, bank 256 x 2 per class; device {args.device}\n", flush=True)
    rows, part_rows = [], []
    for preset in args.preset:
        for variant in args.variants:
            row, parts = run_variant(preset, variant, args)
            rows.append(row)
            part_rows += parts
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    table(["preset", "variant", "off ms", "on ms", "overhead % (wall)", "off CPU ms", "on CPU ms",
           "overhead % (CPU)", "parts ms", "parts % of off", "it/s off", "it/s on", f"{memory} off", "on",
           "warm-up s"], rows)
    table(["preset", "variant", "part", "median ms", "% of off step"], part_rows)
    footer()


if __name__ == "__main__":
    main()
