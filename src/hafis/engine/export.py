"""``hafis export``: a trained segmenter as an ONNX graph for deployment stacks, checked against torch by the command.

The graph takes an image as it is stored, ``images``: uint8 RGB ``(B, 3, H, W)``, and returns ``logits``: float32
``(B, C, H, W)`` at the input size (argmax over C = the mask). The ImageNet normalisation is inside the graph
(:func:`hafis.data.transforms.normalize`, the one training and evaluation use). Batch, height and width are dynamic:
DeepLabV3+ on a ResNet takes any side of at least :data:`MIN_SIDE` pixels; a network with an
``export_size_multiple`` (SegFormer; DeepLabV3+ on EfficientNet-Lite0, whose TF-style padding depends on the side
modulo 32) sides that are multiples of 32, from 64; the command prints which. For other sizes pad the image, or use
``hafis predict``.

The writer is torch's TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``, opset
:data:`OPSET`, weights inside the one file): it traces the network once, about a second for the demo's network on
2 CPU cores, where the ``torch.export``-based exporter takes over a minute (``torch.export`` about 30 s, its ONNX
translation about 50 s) for the same graph (``benchmarks/predict.py --export``). A trace records as constants the
sizes Python computes; the graph is traced at a size other than the two it is checked on, so a size the trace fixed
shows as a failed check, never as a silently wrong file. DPT (DINOv2) resizes its position embeddings to the image,
which a trace cannot follow: it is refused with one line.

The check runs the saved file in onnxruntime on seeded random images of two sizes and compares it with the eager
network: maximum logit difference (allowed: ``tolerance`` x the largest logit magnitude, at least ``tolerance``) and
the share of pixels whose argmax agrees (required: :data:`MIN_AGREEMENT`). A file that fails is not kept under its
name. There is no ``torch.export`` (``.pt2``) format: its serialiser cannot save EfficientNet-Lite0's padding
arithmetic (``math.ceil`` of sizes), nor DPT's for dynamic sizes; in torch, load the checkpoint
(:class:`hafis.Predictor`, :func:`hafis.engine.inference.load_trained_model`).
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from hafis.config import ConfigError
from hafis.data.transforms import normalize

__all__ = ["FORMATS", "MIN_AGREEMENT", "MIN_SIDE", "OPSET", "ExportError", "ExportReport", "InferenceGraph",
           "Parity", "check_sizes", "export_model", "size_step"]

#: what ``hafis export --format`` writes
FORMATS = ("onnx",)
#: the ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)
OPSET = 18
#: smallest image side the exported graph accepts
MIN_SIDE = 32
#: share of pixels whose argmax must agree between the saved file and torch
MIN_AGREEMENT = 0.999
#: packages of ``pip install 'hafis[export]'`` the export needs, by import name
EXPORT_PACKAGES = {"onnx": ("onnx", "onnxruntime")}
#: the graph's dynamic axes: batch, height, width of the input and of the logits
DYNAMIC_AXES = {name: {0: "batch", 2: "height", 3: "width"} for name in ("images", "logits")}


class ExportError(RuntimeError):
    """The network cannot be exported, or the exported file does not reproduce it within the tolerance."""


class InferenceGraph(nn.Module):
    """The segmenter in inference form: uint8 RGB ``(B, 3, H, W)`` in, logits ``(B, C, H, W)`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(normalize(images)).logits


@dataclass
class Parity:
    """The check of one image size: the largest logit magnitude, the largest difference, the argmax agreement."""

    size: tuple[int, int]
    batch: int
    max_logit: float
    max_diff: float
    agreement: float

    def line(self) -> str:
        return (f"{self.batch} x {self.size[0]}x{self.size[1]}: max |logit difference| {self.max_diff:.3g} "
                f"(logits up to {self.max_logit:.3g}), argmax agreement {100 * self.agreement:.3f} %")


@dataclass
class ExportReport:
    """What :func:`export_model` checked, and its seconds per phase (``export``: trace and write the file,
    ``session``: onnxruntime loads it, ``parity``: eager torch and onnxruntime on the check images)."""

    parity: list[Parity]
    step: int
    seconds: dict[str, float] = field(default_factory=dict)


def size_step(model: nn.Module) -> int:
    """Sides the exported graph takes are multiples of this (1: any side >= :data:`MIN_SIDE`): the largest
    ``export_size_multiple`` or ``input_multiple`` the network or one of its modules declares."""
    return max(int(getattr(m, "export_size_multiple", getattr(m, "input_multiple", 1))) for m in model.modules())


def check_sizes(step: int, crop_size: int) -> list[tuple[int, tuple[int, int]]]:
    """``(batch, (H, W))`` of the parity check for a graph taking sides that are multiples of ``step``: about the
    training crop, then a larger non-square size (odd where the graph allows it)."""
    side = max(MIN_SIDE if step == 1 else 2 * step, -(-crop_size // step) * step)
    if step == 1:
        return [(2, (side, side)), (1, (side + side // 2 + 3, side + 5))]
    return [(2, (side, side)), (1, (side + step, side + 2 * step))]


def trace_size(step: int, sizes: Sequence[tuple[int, tuple[int, int]]]) -> tuple[int, int]:
    """The image size the graph is traced at: a multiple of ``step``, unlike every check size, height != width."""
    checked = {s for _, s in sizes}
    side = max(MIN_SIDE if step == 1 else 2 * step, 2 * step)
    h, w = side + 2 * step, side + step
    while (h, w) in checked or (w, h) in checked:
        h, w = h + step, w + step
    return h, w


def require_packages(fmt: str) -> None:
    missing = [name for name in EXPORT_PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format {fmt} needs {', '.join(missing)}: pip install 'hafis[export]'")


def write_onnx(graph: InferenceGraph, path: Path, size: tuple[int, int]) -> None:
    """Trace ``graph`` on a uint8 batch of 2 images of ``size`` and write the ONNX file (dynamic batch and sides;
    the class axis of the logits declared with its size, which the exporter leaves symbolic after a resize)."""
    import onnx

    example = torch.zeros((2, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        classes = int(graph(example[:1]).shape[1])
    try:
        with warnings.catch_warnings():  # the tracer's warnings about Python sizes (the check tests them) and the
            warnings.simplefilter("ignore")  # exporter's deprecation notice
            torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["logits"],
                              opset_version=OPSET, dynamic_axes=DYNAMIC_AXES, dynamo=False)
    except (RuntimeError, TypeError, ValueError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"the network cannot be traced for dynamic image sizes ({text[:200]})") from None
    finally:
        graph.eval()  # the exporter restores the training flag it found; the eager side of the check runs in eval
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
    onnx.save(model, str(path))


def onnx_runner(path: Path) -> Callable[[Tensor], Tensor]:
    """An onnxruntime session of ``path`` (CPU, torch's thread count) as ``images -> logits``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: a failed run raises, and the check reports it
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


@torch.no_grad()
def parity(graph: InferenceGraph, run: Callable[[Tensor], Tensor],
           sizes: Sequence[tuple[int, tuple[int, int]]], seed: int = 0) -> list[Parity]:
    """Compare ``run`` (the saved file) with ``graph`` (eager torch) on seeded random uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch, (h, w) in sizes:
        images = torch.randint(0, 256, (batch, 3, h, w), generator=generator, dtype=torch.uint8)
        expected = graph(images)
        try:
            got = run(images)
        except Exception as exc:  # onnxruntime's own types: a shape the trace fixed, an unsupported node
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ExportError(f"the exported graph fails on input {tuple(images.shape)}: {text[:200]}") from None
        if got.shape != expected.shape:
            raise ExportError(f"the exported graph gives logits of shape {tuple(got.shape)} for input "
                              f"{tuple(images.shape)}; torch gives {tuple(expected.shape)}")
        results.append(Parity((h, w), batch, float(expected.abs().max()), float((got - expected).abs().max()),
                              float((got.argmax(1) == expected.argmax(1)).float().mean())))
    return results


def export_model(model: nn.Module, out: Path, fmt: str = "onnx", crop_size: int = MIN_SIDE,
                 tolerance: float = 1e-4, log: Optional[Callable[[str], None]] = print) -> ExportReport:
    """Write ``model`` (eval mode, CPU) to ``out`` as ``fmt`` and check it (module docstring); a file that fails
    the check is removed and :class:`ExportError` raised, so ``out`` is either a checked export or untouched."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not tolerance > 0:
        raise ConfigError(f"the tolerance must be > 0, got {tolerance!r}")
    require_packages(fmt)
    graph = InferenceGraph(model.cpu())
    step = size_step(model)
    sizes = check_sizes(step, crop_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    if log is not None:
        log(f"{fmt}: input 'images' uint8 (batch, 3, height, width), output 'logits' float32 (batch, classes, "
            f"height, width); " + ("sides >= 32 px" if step == 1 else f"sides multiples of {step} px, >= {2 * step}")
            + f"; opset {OPSET}")
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        write_onnx(graph, tmp, trace_size(step, sizes))
        seconds["export"] = time.perf_counter() - start
        try:
            run = onnx_runner(tmp)
        except Exception as exc:  # onnxruntime's own types
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ExportError(f"onnxruntime cannot load the exported graph: {text[:200]}") from None
        seconds["session"] = time.perf_counter() - start - seconds["export"]
        results = parity(graph, run, sizes)
        seconds["parity"] = time.perf_counter() - start - seconds["export"] - seconds["session"]
        for r in results:
            if log is not None:
                log(f"{fmt} vs torch, {r.line()}")
        bad = [r for r in results if r.max_diff > tolerance * max(1.0, r.max_logit) or r.agreement < MIN_AGREEMENT]
        if bad:
            raise ExportError(f"the {fmt} export does not match torch: {bad[0].line()} (allowed: a difference of "
                              f"{tolerance:g} x max(1, largest logit), agreement >= {100 * MIN_AGREEMENT:g} %); "
                              f"{out} not written")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportReport(results, step, seconds)
