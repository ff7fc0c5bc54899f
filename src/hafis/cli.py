"""``hafis`` command line: ``train``, ``eval``, ``predict``, ``export``, ``detect``, ``prepare``, ``visualize``,
``demo``, ``compare``.

Errors a user can fix (a bad option, config key or value, a missing file, an output path that cannot be written, an
unreadable, unsafe or mismatched checkpoint, a resume that would change the experiment) print one line
``hafis <command>: error: ...`` naming the option, key or file and exit with status 2, the same for every command;
options and output paths are checked before any work starts, and nothing is written before the config is valid.
Numeric options have the ranges of the config keys they stand for (``--batch-size``: ``eval.batch_size``).
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hafis.config import Config, ConfigError, load_config
from hafis.errors import UserError, one_line
from hafis.fields import MAX_SEED, PerCPU, number_error
from hafis.files import check_output, json_dumps

EXIT_USAGE = 2
#: a ``key=value`` config override among a command's other positional arguments
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")
#: training stopped on a NaN / inf loss (the last checkpoint is intact)
EXIT_NONFINITE = 3
#: Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130


#: set by ``hafis train --nproc N`` for its torchrun workers: the run folder its launcher has claimed
_CLAIMED_ENV = "HAFIS_CLAIMED_RUN_DIR"
#: processes and threads a command may start on one machine (``--nproc``, ``compare --jobs`` / ``--threads``)
MAX_PROCESSES = PerCPU(8)
#: machines of one ``hafis train --nnodes`` job
MAX_NODES = 4096


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line ``hafis CMD: error: ...`` and exit 2, like every other mistake
    (``--help`` shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def number(kind: type, lo: float = -math.inf, hi: Any = math.inf, lo_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: an int or float in the range (as :func:`hafis.fields.bounded` declares one)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        problem = number_error(value, lo, hi, lo_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def like(key: str) -> Callable[[str], Any]:
    """An argparse ``type`` with the type and range of the config key ``key`` (dotted)."""
    owner: Any = Config
    for part in key.split("."):
        f = {f.name: f for f in dataclasses.fields(owner)}[part]
        owner = typing.get_type_hints(owner)[part]
    lo, hi, lo_open, _ = f.metadata["range"]
    return number(int if "int" in str(f.type) else float, lo, hi, lo_open)


def _train(args: argparse.Namespace) -> int:
    from hafis.engine import run_folder
    from hafis.engine.trainer import Trainer

    config = load_config(args.config, args.overrides)
    resume = args.resume is not None
    # one process owns the folder: the launcher of a one-machine torchrun, else global rank 0
    owner = os.environ.get("RANK", "0") == "0" and \
        os.environ.get(_CLAIMED_ENV) != str(config.run_dir.resolve())
    if owner:  # before anything is built: a taken folder, or one that cannot be made, is refused at once
        check_output(config.run_dir, "folder", "output_dir")
        run_folder.check_free(config.run_dir, resume, args.overwrite)
    if (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        if args.nnodes > 1:  # every node runs a launcher: the global rank 0 claims the folder
            return _launch_torchrun(args)
        with run_folder.claim(config.run_dir, resume, args.overwrite):
            os.environ[_CLAIMED_ENV] = str(config.run_dir.resolve())
            return _launch_torchrun(args)
    trainer = Trainer(config)
    lock = run_folder.claim(config.run_dir, resume, args.overwrite) if owner else None
    try:
        if resume:
            path = trainer.resume(Path(args.resume) if args.resume else None, tuple(args.allow_change))
            print(f"resumed from {path} at iteration {trainer.iteration}" if path else "no checkpoint found; starting")
        result = trainer.train()
    finally:
        from hafis.engine import distributed

        distributed.teardown()
        if lock is not None:
            lock.release()
    if result is not None and trainer.dist.is_main:
        print(json_dumps({"run_dir": str(config.run_dir), "iteration": trainer.iteration, "miou": result.miou,
                          "best_miou": trainer.best_miou}))
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``hafis train --nproc N``: the same command under ``torchrun --standalone --nproc_per_node N``; with
    ``--nnodes M --rdzv-endpoint HOST:PORT`` under torchrun's c10d rendezvous instead (run it on every node)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    from hafis.engine.distributed import DistributedSetupError

    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a host every node reaches)")
        launch = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                  f"--rdzv-id={args.rdzv_id}"]
    else:
        launch = ["--standalone"]
    command = [*launch, f"--nproc_per_node={args.nproc}", "-m", "hafis", "train", args.config, *args.overrides]
    if args.resume is not None:
        command += ["--resume", args.resume] if args.resume else ["--resume"]
    for key in args.allow_change:
        command += ["--allow-change", key]
    if args.overwrite:
        command.append("--overwrite")
    try:
        torchrun(command)
    except RendezvousError as exc:
        raise DistributedSetupError(f"rendezvous at {args.rdzv_endpoint or 'localhost'} failed: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                    "; the endpoint must be reachable from every node, and every node must use the "
                                    "same --rdzv-endpoint, --rdzv-id and --nnodes") from None
    except ChildFailedError as exc:  # the workers printed their own error
        return max((f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0), default=1)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hafis.data import build_sources
    from hafis.engine.build import resolve_device
    from hafis.engine.inference import checked_class_names, load_trained_model

    config = load_config(args.config, args.overrides)
    device = resolve_device(config.train.device)
    _, _, val = build_sources(config.data)
    model, state, _ = load_trained_model(config, args.checkpoint, num_classes=val.num_classes)
    checked_class_names(config, state, val.num_classes, args.checkpoint)
    model.to(device)
    from hafis.engine.evaluation import build_eval_loader, eval_settings, evaluate, iou_table

    loader = build_eval_loader(val, config.eval.batch_size, config.data.num_workers)
    settings = eval_settings(config)
    result = evaluate(model, loader, val.num_classes, device, **settings)
    print(f"checkpoint {args.checkpoint} (iteration {state.get('iteration')}), {settings['mode']} evaluation on "
          f"{len(val)} images: mIoU {100 * result.miou:.2f}")
    print(iou_table(result.iou, val.class_names, result.miou))
    print(json_dumps({"iteration": state.get("iteration"), **result.record()}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from hafis.engine.inference import Predictor, predict_files

    args.overrides = [i for i in args.inputs if _OVERRIDE.match(i) and not Path(i).exists()]
    args.inputs = [i for i in args.inputs if i not in args.overrides]
    check_output(args.out, "folder", "--out")
    predictor = Predictor.from_run(args.config, args.checkpoint, network=args.network, device=args.device,
                                   mode=args.mode, window=args.window, overrides=args.overrides)
    config = load_config(args.config, args.overrides)
    summary = predict_files(predictor, args.inputs, args.out, batch_size=args.batch_size or config.eval.batch_size,
                            overlay=args.overlay, scores=args.scores)
    if not summary["images"]:
        raise ConfigError(f"none of the {len(summary['skipped'])} input(s) could be read as an image"
                          if summary["skipped"] else "no input images given")
    print(f"{len(summary['images'])} image(s) predicted into {args.out} ({len(summary['skipped'])} skipped); "
          f"summary: {Path(args.out) / 'predictions.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hafis.engine.export import ExportError, export_model, require_packages
    from hafis.engine.inference import checked_class_names, load_trained_model

    config = load_config(args.config, args.overrides)
    require_packages(args.format)
    check_output(args.out, "file", "--out", example="model.onnx")
    model, state, num_classes = load_trained_model(config, args.checkpoint, args.network)
    checked_class_names(config, state, num_classes, args.checkpoint)
    try:
        export_model(model, Path(args.out), args.format, config.data.crop_size, args.tolerance)
    except ExportError as exc:  # not the user's mistake, but one line all the same
        if args.debug:
            raise
        print(f"hafis export: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from hafis.detection.step import run_detect

    config = load_config(args.config, args.overrides)
    check_output(config.detector.output_dir.format(name=config.name), "folder", "detector.output_dir")
    detections, cache = run_detect(config, retrain=args.retrain)
    print(json_dumps({"cache": str(cache.path), **detections.summary(config.weighting.tau_det)}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from hafis.data.splits import prepare_command

    problem = number_error(args.seed, 0, MAX_SEED)
    if problem:
        raise ConfigError(f"--seed {problem}")
    if args.out is not None:
        check_output(args.out, "folder", "--out")
    return prepare_command(args)


def _visualize(args: argparse.Namespace) -> int:
    from hafis.engine.visualize import visualize

    config = load_config(args.config, args.overrides)
    check_output(args.out, "folder", "--out")
    try:
        indices = [int(i) for i in args.images.split(",")] if args.images else None
    except ValueError:
        raise ConfigError(f"--images: expected comma-separated image indices such as 0,5,9, got {args.images!r}") \
            from None
    for path in visualize(config, Path(args.checkpoint), Path(args.out), args.split, indices):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hafis.demo import run_demo

    check_output(args.out, "folder", "--out")
    frameworks = None
    if args.frameworks:
        from hafis.frameworks import FRAMEWORKS

        frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        bad = [f for f in frameworks if f not in FRAMEWORKS or f == "supervised"]
        if bad or not frameworks:
            raise ConfigError(f"--frameworks: unknown or unusable framework(s) {bad}; valid: "
                              f"{', '.join(f for f in FRAMEWORKS if f != 'supervised')}")
    records = run_demo(Path(args.out), quick=args.quick, overrides=args.overrides, frameworks=frameworks,
                       data=args.data)
    return 0 if all(r.miou for r in records) else 1


def _compare(args: argparse.Namespace) -> int:
    import shlex

    from hafis.engine.compare.plan import parse_arm, parse_seeds
    from hafis.engine.compare.pool import Comparison
    from hafis.engine.compare.tables import parse_contrast, parse_fractions

    command = shlex.join(["hafis", *args.argv])
    out = check_output(args.out, "folder", "--out")
    records = Path(args.records) if args.records else None
    if args.report_only and not args.arm:
        comparison = Comparison.from_plan(out, records=records)
    else:
        if args.config is None or not args.arm:
            raise ConfigError("hafis compare needs CONFIG and at least one --arm 'NAME: key=value ...'")
        arms = [parse_arm(a) for a in args.arm]
        contrasts = [parse_contrast(c, [a.name for a in arms]) for c in args.contrast]
        comparison = Comparison(Path(args.config), arms, parse_seeds(args.seeds), args.set, out, args.baseline,
                                command, records=records, contrasts=contrasts, fractions=parse_fractions(args.at))
    if args.report_only:
        comparison.report()
        print(f"[compare] report rebuilt: {out / 'report.md'}")
        return 0
    return comparison.run(args.jobs, args.threads)


def build_parser() -> argparse.ArgumentParser:
    from hafis.engine.export import FORMATS
    from hafis.engine.inference import NETWORKS

    parser = _Parser(prog="hafis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config: hafis train CONFIG [key=value ...]")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides such as train.iterations=100")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="resume from PATH, or from the run's newest readable checkpoint when PATH is omitted")
    p.add_argument("--nproc", type=number(int, 1, MAX_PROCESSES), default=1,
                   help="processes on this machine (DDP via torchrun: one per GPU, or gloo on CPU)")
    p.add_argument("--nnodes", type=number(int, 1, MAX_NODES), default=1,
                   help="machines taking part (run the same command on each)")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="with --nnodes: torchrun's c10d rendezvous point, reachable from every node")
    p.add_argument("--rdzv-id", default="hafis", help="with --nnodes: one id per job, the same on every node")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="on --resume, accept a changed key (or section) that alters the experiment; recorded in "
                        "metrics.jsonl (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the run already in the run folder (its checkpoints, metrics.jsonl, config.yaml, "
                        "provenance.jsonl, TensorBoard logs) instead of refusing to train into it")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="segment new images with a trained checkpoint: palette PNGs of class ids "
                                       "at each image's size, and predictions.json (class areas)")
    p.add_argument("config")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or .txt files listing image paths; key=value "
                        "items that are not files are config overrides")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder of the masks and predictions.json")
    p.add_argument("--overlay", action="store_true", help="also a JPEG of the mask blended over the image")
    p.add_argument("--scores", action="store_true", help="also the top-class probability map (8-bit PNG)")
    p.add_argument("--mode", choices=("whole", "sliding"), default=None,
                   help="whole-image or sliding-window inference (default: the config's eval.mode)")
    p.add_argument("--window", type=like("eval.window"), default=None,
                   help="sliding window side (default: eval.window)")
    p.add_argument("--network", choices=NETWORKS, default=None,
                   help="a mean-teacher checkpoint's student or teacher (default: the network its evaluation "
                        "reports)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the config's train.device)")
    p.add_argument("--batch-size", type=like("eval.batch_size"), default=None,
                   help="images of one size per forward pass (default: eval.batch_size)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="the trained segmenter as ONNX, normalisation inside, dynamic batch and size, "
                                      "checked against torch on two image sizes")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx, checked with onnxruntime (needs pip install 'hafis[export]')")
    p.add_argument("--network", choices=NETWORKS, default=None,
                   help="a mean-teacher checkpoint's student or teacher (default: the network its evaluation "
                        "reports)")
    p.add_argument("--tolerance", type=number(float, 0, 1, lo_open=True), default=1e-4,
                   help="largest logit difference allowed, times max(1, largest logit) (default 1e-4)")
    p.set_defaults(func=_export)

    p = sub.add_parser("detect", help="train the detector on the labelled images and cache its detections over the "
                                      "unlabelled ones (for weighting.reliable: detector); resumable")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides; use the same ones as for hafis train")
    p.add_argument("--retrain", action="store_true", help="train the detector again even if a matching one exists")
    p.set_defaults(func=_detect)

    from hafis.data.splits import add_prepare_arguments

    p = sub.add_parser("prepare", help="check a dataset tree (every problem, with paths) and write split lists: "
                                       "seeded (--labelled N|FRACTION --seed S) or the published ones "
                                       "(--published unimatch|u2pl)")
    add_prepare_arguments(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("visualize", help="PNG grids of predictions, pseudo-labels, reliable masks and weight maps")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("unlabelled", "labelled", "val"), default="unlabelled")
    p.add_argument("--images", default="", help="comma-separated image indices of the split (default: the first 4)")
    p.set_defaults(func=_visualize)

    p = sub.add_parser("demo", help="supervised vs UniMatch vs UniMatch + weighting, one seed")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 5 minutes on 2 CPU cores)")
    p.add_argument("--data", choices=("auto", "garments", "synthetic"), default="auto",
                   help="garments (needs Fashion-MNIST: apt-get install dataset-fashion-mnist), the built-in synthetic "
                        "scenes, or auto: garments when Fashion-MNIST is found (default)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--frameworks", default=None, metavar="A,B,...",
                   help="instead of the default runs: supervised, then each of these frameworks without and with "
                        "the weighting, in one table (e.g. unimatch,u2pl,ael,augseg)")
    p.add_argument("overrides", nargs="*", help="overrides applied to every run of the demo")
    p.set_defaults(func=_demo)

    p = sub.add_parser("compare", help="train every arm x seed (resumable, N side by side) and report mean ± std, "
                                       "paired differences with 95 %% intervals, curves and diagnostics")
    p.add_argument("config", nargs="?", help="the experiment's YAML (optional with --report-only)")
    p.add_argument("--arm", action="append", default=[], metavar="'NAME: key=value ...'",
                   help="one arm: a name and its overrides; repeat for each arm")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--jobs", type=number(int, 1, MAX_PROCESSES), default=1, help="runs side by side (default 1)")
    p.add_argument("--threads", type=number(int, 1, MAX_PROCESSES), default=None,
                   help="CPU threads of each run (default: cpu_count // jobs)")
    p.add_argument("--out", required=True, help="folder of the runs, results.json and report.md")
    p.add_argument("--baseline", default=None, help="arm the others are compared with (default: the first)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="key=value",
                   help="overrides for every arm")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the runs that exist")
    p.add_argument("--records", default=None, metavar="DIR",
                   help="copy each finished run's records (config, metrics, status, provenance; no checkpoint) into "
                        "DIR as it finishes, and put DIR's runs back where --out lacks them (a committed archive)")
    p.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="a paired difference A - B for the report's contrasts section, at --at fractions of the "
                        "schedule, its end and the best evaluation; repeat for each")
    p.add_argument("--at", default="0.25,0.5", help="fractions of the schedule of --contrast (default 0.25,0.5)")
    p.set_defaults(func=_compare)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # overrides may also follow an option (hafis train CONFIG --nproc 2 a.b=1): argparse leaves those unparsed
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    import torch

    from hafis.engine.distributed import DistributedSetupError
    from hafis.engine.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except (UserError, FileNotFoundError, DistributedSetupError, MemoryError, torch.OutOfMemoryError) as exc:
        if args.debug:
            raise
        what = "out of memory (a smaller batch, crop or model?): " if isinstance(
            exc, (MemoryError, torch.OutOfMemoryError)) else ""
        print(f"hafis {args.command}: error: {what}{one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as exc:
        if args.debug:
            raise
        print(f"hafis {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = "; continue with --resume (from the last checkpoint)" if args.command == "train" else ""
        print(f"hafis {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:  # torch's CPU allocator reports an impossible allocation as a RuntimeError
        if args.debug or "can't allocate memory" not in str(exc):
            raise
        print(f"hafis {args.command}: error: out of memory (a smaller batch, crop or model?): {one_line(exc)}",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
