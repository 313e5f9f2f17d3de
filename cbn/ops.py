"""CBN's one extra operation, a conv weight gradient, as a named operator: ``cbn::conv_weight_grad``.

Being a single registered op (rather than aten::convolution_backward inside Python code) lets FLOP
counters see it: jit tracing, which fvcore uses, cannot record convolution_backward at all but
records a custom op as one node, for which bench.flops registers an fvcore handle; and
torch.utils.flop_counter.FlopCounterMode counts it with the formula registered below.

A custom op costs 25-50 microseconds of host time per call over calling aten directly (its
dispatch through Python). ``weight_grad`` therefore goes through the op only while something
records ops (jit tracing, torch.compile, a dispatch mode such as FlopCounterMode, the profiler),
and calls aten itself in plain eager training, where nothing would see the name.

The weight gradient is aten's convolution_backward, the kernel the conv's own backward uses, on
every device. (A table choosing aten's im2col + GEMM kernel for some CPU shapes, measured on one
AMD EPYC, gained there about as much as it lost on an Intel Xeon, 2.7% of a ResNet-18 step: nothing
here is tuned to one CPU model.)
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from cbn.functional import capturing


def weight_grad(input: torch.Tensor, grad_output: torch.Tensor, weight: torch.Tensor, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """conv_weight_grad, through the registered op only when something records ops (see above)."""
    recording = capturing() or torch._C._len_torch_dispatch_stack() > 0 or torch.autograd.profiler._is_profiler_enabled
    op = conv_weight_grad if recording else _weight_grad_aten
    return op(input, grad_output, weight, stride, padding, dilation, groups)


@torch.library.custom_op("cbn::conv_weight_grad", mutates_args=())
def conv_weight_grad(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Gradient of sum(grad_output * conv2d(input, W)) with respect to W, a tensor shaped like weight
    (only weight's shape is read: passing the conv's own weight spares allocating a stand-in)."""
    return _weight_grad_aten(input, grad_output, weight, stride, padding, dilation, groups)


def _weight_grad_aten(input, grad_output, weight, stride, padding, dilation, groups):
    # Both operands in one memory format (the input's: channels_last under --channels-last).
    layout = torch.channels_last if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous() \
        else torch.contiguous_format
    return torch.ops.aten.convolution_backward(grad_output.contiguous(memory_format=layout), input, weight, None, stride,
                                               padding, dilation, False, [0, 0], groups, [False, True, False])[1]


@conv_weight_grad.register_fake
def _(input, grad_output, weight, stride, padding, dilation, groups):
    return input.new_empty(weight.shape)


def conv_weight_grad_macs(grad_output_shape, weight_shape) -> int:
    """Multiply-adds: every weight entry accumulates over the N*H'*W' output positions of its channel.

    The one formula for this op: FlopCounterMode's (below, 2 flops per multiply-add) and fvcore's
    handle (bench/flops.py, 1 per multiply-add) both call it."""
    return math.prod(grad_output_shape) * math.prod(weight_shape[1:])


def conv_weight_grad_flops(grad_output_shape, weight_shape) -> int:
    """Flops, 2 per multiply-add."""
    return 2 * conv_weight_grad_macs(grad_output_shape, weight_shape)


@register_flop_formula(torch.ops.cbn.conv_weight_grad)
def _flop_formula(input_shape, grad_output_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_weight_grad_flops(grad_output_shape, weight_shape)
