"""``hafis export``: a trained segmenter for deployment stacks, checked against torch by the command itself.

The exported graph takes an image as it is stored, ``images``: uint8 RGB ``(B, 3, H, W)``, and returns ``logits``:
float32 ``(B, C, H, W)`` at the input size (argmax over C = the mask). The ImageNet normalisation is inside the
graph (:func:`hafis.data.transforms.normalize`, the one training and evaluation use). Batch, height and width are
dynamic: DeepLabV3+ on a ResNet takes any side of at least :data:`MIN_SIDE` pixels; SegFormer and DeepLabV3+ on
EfficientNet-Lite0 sides that are multiples of 32, from 64 (their shape arithmetic specialises on other sizes); the
command prints which. For other sizes pad the image, or use ``hafis predict``.

Formats: ``onnx`` (the torch.export-based exporter, opset :data:`OPSET`, weights inside the one file), checked with
onnxruntime; ``pt2`` (a ``torch.export`` program, ``torch.export.load(path).module()``), checked with torch. The check
runs the saved file on seeded random images of two sizes and compares it with the eager network: maximum logit
difference (allowed: ``tolerance`` x the largest logit magnitude, at least ``tolerance``) and the share of pixels
whose argmax agrees (required: :data:`MIN_AGREEMENT`). A file that fails is not kept under its name.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from hafis.config import ConfigError
from hafis.data.transforms import normalize

__all__ = ["FORMATS", "MIN_AGREEMENT", "MIN_SIDE", "OPSET", "ExportError", "InferenceGraph", "Parity",
           "check_sizes", "export_model"]

#: what ``hafis export --format`` writes
FORMATS = ("onnx", "pt2")
#: the ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)
OPSET = 18
#: smallest image side the exported graph accepts
MIN_SIDE = 32
#: share of pixels whose argmax must agree between the saved file and torch
MIN_AGREEMENT = 0.999
#: packages of ``pip install 'hafis[export]'``, by import name
EXPORT_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "pt2": ()}


class ExportError(RuntimeError):
    """The exported file does not reproduce the torch network within the tolerance."""


class InferenceGraph(nn.Module):
    """The segmenter in inference form: uint8 RGB ``(B, 3, H, W)`` in, logits ``(B, C, H, W)`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

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


def check_sizes(step: int, crop_size: int) -> list[tuple[int, tuple[int, int]]]:
    """``(batch, (H, W))`` of the parity check for a graph taking sides that are multiples of ``step``: about the
    training crop, then a larger non-square size (odd where the graph allows it)."""
    side = max(MIN_SIDE if step == 1 else 2 * step, -(-crop_size // step) * step)
    if step == 1:
        return [(2, (side, side)), (1, (side + side // 2 + 3, side + 5))]
    return [(2, (side, side)), (1, (side + step, side + 2 * step))]


def require_packages(fmt: str) -> None:
    missing = [name for name in EXPORT_PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format {fmt} needs {', '.join(missing)}: pip install 'hafis[export]'")


def _dynamic_shapes(step: int) -> tuple[dict, ...]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    if step == 1:
        return ({0: batch, 2: Dim("height", min=MIN_SIDE, max=16384), 3: Dim("width", min=MIN_SIDE, max=16384)},)
    most = 16384 // step
    return ({0: batch, 2: step * Dim("height_steps", min=2, max=most),
             3: step * Dim("width_steps", min=2, max=most)},)


def trace(graph: InferenceGraph) -> tuple["torch.export.ExportedProgram", int]:
    """``(program, step)``: ``graph`` exported for every side >= :data:`MIN_SIDE` (``step`` 1), else for sides
    that are multiples of 32 from 64 (networks whose shape arithmetic specialises on other sizes: TF-style "same"
    padding, as EfficientNet-Lite0's). A network that declares ``export_size_multiple`` (SegFormer: 32) or
    ``input_multiple`` (DPT: 14) is exported for multiples of it from twice it, directly."""
    from torch._dynamo.exc import UserError

    declared = int(getattr(graph.model, "export_size_multiple", getattr(graph.model, "input_multiple", 1)))
    problems = []
    for step in [declared] + ([32] if declared == 1 else []):
        side = check_sizes(step, MIN_SIDE)[0][1][0]
        example = torch.zeros((2, 3, side + 2 * step, side + step), dtype=torch.uint8)
        try:
            return torch.export.export(graph, (example,), dynamic_shapes=_dynamic_shapes(step)), step
        except UserError as exc:
            problems.append(f"sides multiples of {step}: {str(exc).strip().splitlines()[0]}")
    raise ExportError(f"the network cannot be exported for dynamic image sizes ({'; '.join(problems)})")


def _write_onnx(program: "torch.export.ExportedProgram", path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # the exporter reports its passes as warnings; failures raise
        warnings.simplefilter("ignore")
        torch.onnx.export(program, f=str(path), input_names=["images"], output_names=["logits"],
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False)


def _run_onnx(path: Path) -> Callable[[Tensor], Tensor]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def _write_pt2(program: "torch.export.ExportedProgram", path: Path) -> None:
    torch.export.save(program, str(path))


def _run_pt2(path: Path) -> Callable[[Tensor], Tensor]:
    module = torch.export.load(str(path)).module()
    return lambda images: module(images)


WRITERS = {"onnx": (_write_onnx, _run_onnx), "pt2": (_write_pt2, _run_pt2)}


@torch.no_grad()
def parity(graph: InferenceGraph, run: Callable[[Tensor], Tensor],
           sizes: Sequence[tuple[int, tuple[int, int]]], seed: int = 0) -> list[Parity]:
    """Compare ``run`` (the saved file) with ``graph`` (eager torch) on seeded random uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch, (h, w) in sizes:
        images = torch.randint(0, 256, (batch, 3, h, w), generator=generator, dtype=torch.uint8)
        expected, got = graph(images), run(images)
        if got.shape != expected.shape:
            raise ExportError(f"the exported graph gives logits of shape {tuple(got.shape)} for input "
                              f"{tuple(images.shape)}; torch gives {tuple(expected.shape)}")
        results.append(Parity((h, w), batch, float(expected.abs().max()), float((got - expected).abs().max()),
                              float((got.argmax(1) == expected.argmax(1)).float().mean())))
    return results


def export_model(model: nn.Module, out: Path, fmt: str = "onnx", crop_size: int = MIN_SIDE,
                 tolerance: float = 1e-4, log: Optional[Callable[[str], None]] = print) -> list[Parity]:
    """Write ``model`` (eval mode, CPU) to ``out`` as ``fmt`` and check it (module docstring); a file that fails
    the check is removed and :class:`ExportError` raised, so ``out`` is either a checked export or untouched."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_packages(fmt)
    write, run = WRITERS[fmt]
    graph = InferenceGraph(model.cpu().eval())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    program, step = trace(graph)
    if log is not None:
        log(f"{fmt}: input 'images' uint8 (batch, 3, height, width), output 'logits' float32 (batch, classes, "
            f"height, width); " + ("sides >= 32 px" if step == 1 else f"sides multiples of {step} px, >= {2 * step}")
            + (f"; opset {OPSET}" if fmt == "onnx" else ""))
    try:
        write(program, tmp)
        results = parity(graph, run(tmp), check_sizes(step, crop_size))
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
    return results
