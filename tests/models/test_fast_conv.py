"""The CPU fast convolution paths give PyTorch's own outputs and gradients (float64, so up to rounding only)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hafis.models import DeepLabV3Plus
from hafis.models.fast_conv import FastConv2d, crop_padding_taps, use_fast_convs


@pytest.mark.parametrize("size, kernel, padding, dilation, cropped, new_padding", [
    (4, 3, 6, 6, 1, 0),      # ASPP dilation 6 on a 4x4 map: the centre tap alone
    (4, 3, 18, 18, 1, 0),
    (4, 5, 4, 2, 3, 2),      # dilated 5x5 depthwise on 4x4: the outer ring reads padding only
    (4, 3, 1, 1, 3, 1),      # every tap reads the map somewhere
    (5, 5, 4, 2, 5, 4),      # a 5-wide map: the outer taps reach row 0 / row 4
    (16, 3, 12, 12, 3, 12),  # dilation 12 < 16: the outer taps still reach rows 12-15
    (16, 3, 16, 16, 1, 0),   # dilation = map size: centre tap
    (16, 3, 6, 6, 3, 6),
    (1, 7, 3, 1, 1, 0),
    (4, 3, 0, 1, 3, 0),      # no padding, nothing to cut
])
def test_all_padding_taps_are_cut_by_hand(size, kernel, padding, dilation, cropped, new_padding):
    weight = torch.zeros(2, 2, kernel, kernel)
    w, p = crop_padding_taps(weight, (size, size), (padding, padding), (dilation, dilation))
    assert tuple(w.shape[2:]) == (cropped, cropped) and p == (new_padding, new_padding)


def test_the_cut_is_per_axis():
    w, p = crop_padding_taps(torch.zeros(1, 1, 3, 3), (4, 32), (6, 6), (6, 6))
    assert tuple(w.shape[2:]) == (1, 3) and p == (0, 6)


def _pair(cin, cout, kernel, **kw):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, kernel, **kw).double()
    fast = nn.Conv2d(cin, cout, kernel, **kw).double()
    fast.load_state_dict(ref.state_dict())
    use_fast_convs(fast)
    assert type(fast) is FastConv2d
    return ref, fast


@pytest.mark.parametrize("cin, cout, kernel, kw, size", [
    (6, 6, 5, dict(padding=4, dilation=2, groups=6, bias=False), (4, 4)),    # cut + depthwise backward
    (6, 6, 5, dict(padding=2, groups=6), (5, 7)),                           # depthwise 5x5, bias
    (6, 6, 3, dict(padding=2, dilation=2, groups=6), (6, 3)),
    (6, 6, 3, dict(padding=1, groups=6), (4, 4)),                           # plain 3x3 depthwise: PyTorch's
    (5, 4, 3, dict(padding=6, dilation=6), (4, 4)),                          # ASPP branch on a small map
    (5, 4, 3, dict(padding=6, dilation=6), (9, 9)),
    (5, 4, 1, dict(), (3, 3)),
    (6, 6, 3, dict(padding=1, stride=2, groups=6), (8, 8)),                 # stride 2: PyTorch's
])
def test_outputs_and_gradients_equal_pytorchs(cin, cout, kernel, kw, size):
    ref, fast = _pair(cin, cout, kernel, **kw)
    x = torch.randn(3, cin, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(ref(x))
    expected = torch.autograd.grad(ref(x), [x, *ref.parameters()], grad)
    got = torch.autograd.grad(fast(x), [x, *fast.parameters()], grad)
    torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-12)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-12)


def test_depthwise_stays_float32_and_dense_runs_bf16_under_cpu_autocast():
    depthwise = use_fast_convs(nn.Conv2d(4, 4, 5, padding=2, groups=4))
    dense = use_fast_convs(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise(x).dtype == torch.float32
        assert dense(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert depthwise(x).dtype == torch.float32
        assert dense(x).dtype == torch.float16


def test_a_traced_graph_keeps_the_full_kernel():
    """A tracer records no input-size choice: traced on a 4x4 map, the graph still fits a 16x16 one."""
    ref, fast = _pair(3, 2, 3, padding=6, dilation=6)
    traced = torch.jit.trace(fast, torch.randn(1, 3, 4, 4, dtype=torch.float64))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(traced(x), ref(x), rtol=0, atol=1e-12)


def _conv_paddings(graphs) -> list:
    return [node.args[4] for g in graphs for node in g.graph.nodes
            if node.op == "call_function" and node.target is torch.conv2d]


def test_torch_compile_takes_the_fast_paths_for_the_size_it_runs_on():
    """Dynamo guards the input size: a 4x4 map compiles the cut kernel (ASPP's 3x3 at dilation 6 -> its centre tap,
    no padding), a 16x16 one recompiles with the whole kernel; both give PyTorch's output."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    ref, fast = _pair(3, 2, 3, padding=6, dilation=6)
    backend = EagerAndRecordGraphs()
    compiled = torch.compile(fast, backend=backend, fullgraph=True)
    for size, padding in ((4, (0, 0)), (16, (6, 6))):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=1e-12)
        assert _conv_paddings(backend.graphs)[-1] == padding


def test_torch_compile_traces_the_depthwise_backward_and_keeps_pytorchs_gradients():
    torch._dynamo.reset()
    ref, fast = _pair(6, 6, 5, padding=4, dilation=2, groups=6, bias=False)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(ref(x))
    expected = torch.autograd.grad(ref(x), [x, ref.weight], grad)
    got = torch.autograd.grad(compiled(x), [x, fast.weight], grad)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_an_exported_graph_keeps_the_full_kernel():
    """torch.export records no size guard: exported on a 4x4 map with dynamic sizes, it still fits a 16x16 one."""
    from torch.export import Dim, export

    ref, fast = _pair(3, 2, 3, padding=6, dilation=6)
    sizes = {2: Dim("h", min=2, max=64), 3: Dim("w", min=2, max=64)}
    program = export(fast, (torch.randn(1, 3, 4, 4, dtype=torch.float64),), dynamic_shapes=(sizes,))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(program.module()(x), ref(x), rtol=0, atol=1e-12)


def test_the_conversion_keeps_the_state_dict_and_leaves_subclasses():
    model = DeepLabV3Plus(3, backbone="resnet_tiny", feature_dim=8, aspp_channels=8)
    keys = list(model.state_dict())

    class Own(nn.Conv2d):
        pass

    model.extra = Own(1, 1, 1)
    use_fast_convs(model)
    assert type(model.extra) is Own
    assert [k for k in model.state_dict() if not k.startswith("extra.")] == keys
    assert all(type(m) is FastConv2d for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.extra)


def test_a_deeplab_trains_to_the_same_gradients():
    torch.manual_seed(0)
    ref = DeepLabV3Plus(3, backbone="resnet_tiny", feature_dim=8, aspp_channels=8).double()
    fast = use_fast_convs(DeepLabV3Plus(3, backbone="resnet_tiny", feature_dim=8, aspp_channels=8).double())
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    losses = [F.cross_entropy(m(x).logits, torch.zeros(2, 32, 32, dtype=torch.long)) for m in (ref, fast)]
    for loss in losses:
        loss.backward()
    for a, b in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)
