"""CBN's named operators: its one extra operation, a conv weight gradient (``cbn::conv_weight_grad``),
and, under torch.compile, the per-channel dot products that compensate the history (``cbn::row_dots``).

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

``row_dots`` is a batched matrix product that torch.compile must not lower itself: inductor turns a
CPU bmm whose middle dimension is 1 into a product-and-sum, which it fused with the conv weight's
channels_last conversion into a scalar loop with an index division per element. Profiled in a
compiled ResNet-18 step (4 x 224 px, 2 threads), that kernel took 15.8 ms for the two 512-channel
convs of the last stage; eager's bmm calls (these and the patch means) took 7.7 ms for all twenty
layers. As an opaque op it stays aten's bmm; eager calls aten directly. ``conv_weight_grad`` is
tagged flexible_layout for a like reason: with the default tag, inductor copied its channels_last
operands back to the eager layout (an input-sized copy per layer and step).
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


@torch.library.custom_op("cbn::conv_weight_grad", mutates_args=(), tags=(torch.Tag.flexible_layout,))
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
    (only weight's shape is read: passing the conv's own weight spares allocating a stand-in), always
    contiguous, as the fake kernel says (a channels_last input makes aten's channels_last)."""
    return _weight_grad_aten(input, grad_output, weight, stride, padding, dilation, groups).contiguous()


def _weight_grad_aten(input, grad_output, weight, stride, padding, dilation, groups):
    # Both operands in one memory format (the input's: channels_last under --channels-last).
    layout = torch.channels_last if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous() \
        else torch.contiguous_format
    return torch.ops.aten.convolution_backward(grad_output.contiguous(memory_format=layout), input, weight, None, stride,
                                               padding, dilation, False, [0, 0], groups, [False, True, False])[1]


def row_dots(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(S, C): out[s, c] = sum_k weight[c].flatten()[k] * rows[s, c, k], for a contiguous weight
    (C, ...) of K entries per channel and rows (S, C, K). One batched product over channels,
    (C, 1, K) @ (C, K, S), reading rows in place (each channel's K x S block is a transposed matrix
    to BLAS): on a CPU 2.4x faster than a product-and-sum over an (S, C, K) temporary, and 3.5x
    faster than (C, S, K) @ (C, K, 1)."""
    if torch.compiler.is_compiling():
        return _row_dots_op(weight, rows)
    return _row_dots_bmm(weight, rows)


def _row_dots_bmm(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    slots, channels = rows.shape[:2]
    return torch.bmm(weight.view(channels, 1, -1), rows.permute(1, 2, 0)).view(channels, slots).transpose(0, 1)


@torch.library.custom_op("cbn::row_dots", mutates_args=())
def _row_dots_op(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """row_dots as an opaque op (torch.compile), contiguous as its fake kernel says."""
    return _row_dots_bmm(weight, rows).contiguous()


@_row_dots_op.register_fake
def _(weight, rows):
    return rows.new_empty(rows.shape[:2])


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
