"""FLOP handles against hand-computed counts, and counts that repeat."""

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cbn
import cbn.ops
from bench.flops import FVCORE_HANDLES, counted_flops, fvcore_forward_flops

# conv 4 -> 6, 3x3, padding 1, on 2x4x8x8: 2*8*8 positions x 6 outputs x (4*3*3) inputs
CONV_MACS = 2 * 8 * 8 * 6 * 4 * 3 * 3  # 27648
GRAD_SQ_MACS = CONV_MACS  # d nu/d theta: a weight gradient as large as the conv
# d mu/d theta from the batch-summed input (4, 8, 8): its (C_in*H, W) rows times the (W, 3) column
# selector, then the (3, H) row selector times each channel's (H, 3)
GRAD_MEAN_MACS = 4 * 8 * 8 * 3 + 4 * 3 * 8 * 3
# the compensation of one past slot (window 2), at the 6 x 36 weight: L_mu one (1 x 36) @ (36 x 6)
# product, L_nu six row-wise (1 x 36) @ (36 x 1) products
LINEAR_FORM_MACS = 6 * 36


def conv_cbn(window: int = 2):
    net = cbn.convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)), window=window)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8)

    def step():
        net(x).sum().backward()
        opt.step()
        opt.zero_grad()

    return net, x, step


def test_fvcore_handle_counts_cbn_weight_gradients_exactly():
    net, x, step = conv_cbn()
    step()  # the trace below is then the first call of a new iteration, which records
    analysis = FlopCountAnalysis(net, (x,)).set_op_handle(**FVCORE_HANDLES)
    analysis.unsupported_ops_warnings(False)
    by_op = analysis.by_operator()
    assert by_op["conv"] == CONV_MACS
    assert by_op["mm"] + by_op["bmm"] == GRAD_MEAN_MACS + 2 * LINEAR_FORM_MACS
    assert by_op["conv_weight_grad"] == GRAD_SQ_MACS
    assert "cbn::conv_weight_grad" not in analysis.unsupported_ops()


def test_flop_counter_formula_for_the_custom_op():
    y, go = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    count = counted_flops(lambda: torch.ops.cbn.conv_weight_grad(y, go, torch.empty(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1))
    assert count == 2 * GRAD_SQ_MACS


def test_weight_grad_goes_through_the_registered_op_only_while_ops_are_recorded(monkeypatch):
    calls = []
    registered = cbn.ops.conv_weight_grad
    monkeypatch.setattr(cbn.ops, "conv_weight_grad", lambda *args: calls.append(1) or registered(*args))
    y, go, weight = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), torch.empty(6, 4, 3, 3)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    plain = cbn.ops.weight_grad(y, go, weight, *geometry)
    assert calls == []  # plain eager: aten directly, no custom-op dispatch
    assert torch.equal(plain, registered(y, go, weight, *geometry))
    with FlopCounterMode(display=False):
        cbn.ops.weight_grad(y, go, weight, *geometry)
    with torch.profiler.profile():
        cbn.ops.weight_grad(y, go, weight, *geometry)
    torch.jit.trace(lambda y, go: cbn.ops.weight_grad(y, go, weight, *geometry), (y, go), check_trace=False)
    assert len(calls) == 3


@pytest.mark.parametrize("input_shape, weight_shape, stride, dilation, groups", [
    ((2, 8, 4, 4), (6, 8, 1, 1), 2, 1, 1),  # 1x1, 8 positions
    ((1, 512, 4, 4), (8, 512, 3, 3), 1, 1, 1),  # 4608-wide rows, 16 positions
    ((2, 4, 8, 8), (6, 4, 3, 3), 1, 1, 1),
    ((1, 512, 4, 4), (8, 512, 3, 3), 1, 2, 1),  # dilated
    ((1, 512, 4, 4), (8, 256, 3, 3), 1, 1, 2),  # grouped
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_grad_is_the_conv_backwards_weight_gradient(input_shape, weight_shape, stride, dilation, groups, dtype):
    torch.manual_seed(0)
    y, weight = torch.randn(input_shape, dtype=dtype), torch.randn(weight_shape, dtype=dtype)
    padding = dilation * (weight_shape[-1] // 2)
    go = torch.randn_like(nn.functional.conv2d(y, weight, None, stride, padding, dilation, groups))
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    got = cbn.ops._weight_grad_aten(y, go, weight, *geometry)
    expected = torch.ops.aten.convolution_backward(go, y, weight, None, *geometry[:3], False, [0, 0], groups,
                                                   [False, True, False])[1]
    assert torch.equal(got, expected)


def test_training_step_counts_include_cbn_and_repeat():
    counts = []
    for _ in range(2):
        torch.manual_seed(0)
        net, x, step = conv_cbn()
        step()
        counts.append(counted_flops(step))
    bn = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    x = torch.randn(2, 4, 8, 8)
    bn_count = counted_flops(lambda: bn(x).sum().backward())
    assert bn_count == 2 * 2 * CONV_MACS  # forward + weight gradient (x needs no gradient)
    extra = counts[0] - bn_count
    assert counts[0] == counts[1]
    assert extra >= 2 * (GRAD_SQ_MACS + GRAD_MEAN_MACS)  # plus the small contractions
    assert extra < 2 * (GRAD_SQ_MACS + GRAD_MEAN_MACS) * 1.05


def test_fvcore_forward_flops_counts_the_conv_and_its_norm():
    net, x, step = conv_cbn()
    macs, skipped = fvcore_forward_flops(net.eval(), (x,))
    assert macs == CONV_MACS + 2 * (2 * 6 * 8 * 8)  # fvcore: inference batch norm with affine, 2 per element
    assert skipped == {}


def test_fvcore_forward_flops_reports_what_it_skipped():
    net, x, step = conv_cbn()
    gated = torch.nn.Sequential(net.eval(), torch.nn.Sigmoid())  # fvcore has no handle for sigmoid
    macs, skipped = fvcore_forward_flops(gated, (x,))
    assert macs == CONV_MACS + 2 * (2 * 6 * 8 * 8)
    assert skipped == {"aten::sigmoid": 1}


def test_fvcore_traces_the_layer_again_and_again():
    """The layer caches small constant tensors (cbn.functional.constant, the patch-mean selectors); one made
    while jit traced a step must not reach a later trace, which fails inside the tracer."""
    from cbn.functional import _constant
    from cbn.statgrad import _grid_selectors

    _constant.cache_clear()
    _grid_selectors.cache_clear()
    net, x, step = conv_cbn()
    counts = []
    for _ in range(3):  # the first trace is a fresh layer's first call, the first to ask for constants
        counts.append(fvcore_forward_flops(net, (x,)))
        step()
    assert counts[0] == counts[1] == counts[2]  # one step's ops, whatever the window holds
