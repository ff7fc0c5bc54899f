"""Exact CPU fast paths for the convolutions that PyTorch's CPU kernels run slowly in training.

Two cases cost a DeepLabV3+ on a small-image CPU benchmark a large share of its step while doing little arithmetic:

- **taps that read only padding.** A dilated kernel whose dilation reaches past the feature map (ASPP's dilations
  6 / 12 / 18 on a 4x4 map, a dilated 5x5 depthwise on the last stage) multiplies zeros with most of its taps. The
  outer rings of taps that read padding for every output pixel are cut off and the padding reduced to match, which
  leaves the output unchanged (the cut taps' weight gradients are zero either way); a 3x3 ASPP branch becomes the
  1x1 convolution of its centre tap.
- **depthwise backward.** oneDNN's depthwise backward falls back to a generic path that takes ~20x its forward's
  time; for stride-1 depthwise layers the input gradient is the forward kernel run on the output gradient with the
  kernel flipped, and the weight gradient is one product-sum per tap, both fast. Under autocast on CPU the depthwise
  layers stay float32 (bf16 depthwise backward is slower still).

:func:`use_fast_convs` switches every plain ``nn.Conv2d`` of a model to :class:`FastConv2d` in place (same
parameters, state-dict keys and module tree). The fast paths are taken only on CPU, for the default zero padding,
in eager mode and under ``torch.compile`` (whose guards check the input size the cut depends on and recompile for
another size), never while ``torch.export`` or a TorchScript tracer records a graph, which would freeze an
input-size-dependent choice into it; the depthwise backward only when a gradient is needed. Everywhere else the
layer is ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastConv2d", "crop_padding_taps", "depthwise_conv2d", "use_fast_convs"]


def _cut(size: int, kernel: int, padding: int, dilation: int) -> int:
    """How many taps at each end of one kernel axis read padding for every output pixel (stride 1, symmetric
    padding); the cut is symmetric so the output size stays, and never removes more padding than there is."""
    out = size + 2 * padding - dilation * (kernel - 1)
    cut = 0
    # tap i reads input rows i*d - p .. i*d - p + out - 1; leading tap `cut` is all padding when its last row is < 0
    while 2 * (cut + 1) <= kernel - 1 and cut * dilation - padding + out - 1 < 0 \
            and (kernel - 1 - cut) * dilation - padding >= size and (cut + 1) * dilation <= padding:
        cut += 1
    return cut


def crop_padding_taps(weight: Tensor, size: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """``(weight, padding)`` of the same stride-1 convolution on a ``size`` map with the all-padding taps cut off."""
    cuts = [_cut(size[a], weight.shape[2 + a], padding[a], dilation[a]) for a in (0, 1)]
    if not any(cuts):
        return weight, padding
    (ch, cw), (kh, kw) = cuts, weight.shape[2:]
    return (weight[:, :, ch:kh - ch, cw:kw - cw],
            (padding[0] - ch * dilation[0], padding[1] - cw * dilation[1]))


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 depthwise convolution (groups = channels, one filter per channel) with a backward made of fast
    kernels: ``dx`` = the same convolution of ``dy`` with the flipped kernel, ``dw`` = a product-sum per tap."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, padding: tuple[int, int], dilation: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.geometry = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        (ph, pw), (dh, dw), has_bias = ctx.geometry
        kh, kw = weight.shape[2:]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
            grad_x = F.conv2d(grad, weight.flip(2, 3), None, 1, flipped, (dh, dw), x.shape[1])
        if ctx.needs_input_grad[1]:
            # channels-last, so that each tap's product-sum runs over contiguous rows of channels
            h, w = grad.shape[2:]
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
            grad_cl = grad.permute(0, 2, 3, 1).contiguous()
            taps = [(grad_cl * padded[:, i * dh:i * dh + h, j * dw:j * dw + w]).sum((0, 1, 2))
                    for i in range(kh) for j in range(kw)]
            grad_w = torch.stack(taps, 1).view_as(weight)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def depthwise_conv2d(x: Tensor, weight: Tensor, bias, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """:class:`_DepthwiseConv`; under CPU autocast in float32 (autocast off inside), so the result is float32."""
    if not torch.is_autocast_enabled("cpu"):
        return _DepthwiseConv.apply(x, weight, bias, padding, dilation)
    with torch.autocast("cpu", enabled=False):
        return _DepthwiseConv.apply(x.float(), weight.float(), None if bias is None else bias.float(), padding,
                                    dilation)


def _recording() -> bool:
    """A graph is being recorded with no guard on the input size (``torch.export``, TorchScript)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the exact CPU fast paths of this module (see its docstring)."""

    def _slow_depthwise(self, weight: Tensor) -> bool:
        """A depthwise layer whose oneDNN backward is the slow generic one: dilated, or more than 3x3 taps (a plain
        3x3 depthwise backward is fast)."""
        return (self.groups == self.in_channels == self.out_channels and weight.shape[1] == 1
                and (self.dilation != (1, 1) or weight.shape[2] * weight.shape[3] > 9))

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        if (input.device.type != "cpu" or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or self.stride != (1, 1) or input.dim() != 4 or _recording()):
            return super()._conv_forward(input, weight, bias)
        weight, padding = crop_padding_taps(weight, input.shape[-2:], self.padding, self.dilation)
        if self._slow_depthwise(weight) and torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            return depthwise_conv2d(input, weight, bias, padding, self.dilation)
        return F.conv2d(input, weight, bias, 1, padding, self.dilation, self.groups)


def use_fast_convs(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Conv2d`` of ``model`` becomes a :class:`FastConv2d` (in place; subclasses with a forward of
    their own, e.g. timm's dynamic-padding ``Conv2dSame``, are left alone). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = FastConv2d
    return model
