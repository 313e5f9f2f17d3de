"""CBN's one extra operation, a conv weight gradient, as a named operator: ``cbn::conv_weight_grad``.

Being a single registered op (rather than aten::convolution_backward inside Python code) lets FLOP
counters see it: jit tracing, which fvcore uses, cannot record convolution_backward at all but
records a custom op as one node, for which bench.flops registers an fvcore handle; and
torch.utils.flop_counter.FlopCounterMode counts it with the formula registered below.

A custom op costs 25-50 microseconds of host time per call over calling aten directly (its
dispatch through Python). ``weight_grad`` therefore goes through the op only while something
records ops (jit tracing, torch.compile, a dispatch mode such as FlopCounterMode, the profiler),
and calls aten itself in plain eager training, where nothing would see the name.

On a CPU the weight gradient is computed by oneDNN or by aten's im2col + GEMM kernel, whichever
is faster for the shapes (``im2col_is_faster``); the two agree to float32 rounding.
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
    if layout == torch.contiguous_format and im2col_is_faster(input, grad_output, weight, dilation, groups):
        return torch.ops.aten._slow_conv2d_backward(grad_output.contiguous(), input, weight, weight.shape[2:], stride,
                                                    padding, [False, True, False])[1]
    return torch.ops.aten.convolution_backward(grad_output.contiguous(memory_format=layout), input, weight, None, stride,
                                               padding, dilation, False, [0, 0], groups, [False, True, False])[1]


# Output positions (N*H'*W') up to which im2col + GEMM beats oneDNN's weight gradient on a CPU.
IM2COL_POSITIONS_1X1 = 1024
IM2COL_POSITIONS = 256
IM2COL_MIN_ROW = 4096  # C_in*kh*kw of a kernel larger than 1x1


def im2col_is_faster(input: torch.Tensor, grad_output: torch.Tensor, weight: torch.Tensor, dilation: list[int],
                     groups: int) -> bool:
    """Whether aten's im2col + GEMM weight gradient (_slow_conv2d_backward: one GEMM per image over
    its unfolded input) beats oneDNN's (convolution_backward's CPU kernel) for these shapes.

    oneDNN's is slow where the output has few positions per channel: a 1x1 kernel with at most
    1024 positions, or a wide kernel row (C_in*kh*kw >= 4096) with at most 256, e.g. ResNet's last
    stage at 4 x 224 px (7x7 outputs, 512 channels). Measured on a 2-core AMD EPYC, torch 2.15,
    2 threads, min of 12, im2col's time over oneDNN's: 1x1 at 98-1024 positions 0.35-0.83 (64-512
    channels); 3x3, 512 channels, 98 and 196 positions 0.80 and 0.75; but 3x3 with 256 channels at
    196 positions 1.22, 512 channels at 392 positions 1.08, and 1.1-1.8 at 784 positions and more.
    Elsewhere (CUDA, groups, dilation, which the im2col kernel lacks) convolution_backward decides."""
    if input.device.type != "cpu" or groups != 1 or any(d != 1 for d in dilation):
        return False
    positions = grad_output.numel() // grad_output.shape[1]
    kernel = weight.shape[2] * weight.shape[3]
    if kernel == 1:
        return positions <= IM2COL_POSITIONS_1X1
    return positions <= IM2COL_POSITIONS and weight.shape[1] * kernel >= IM2COL_MIN_ROW


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
