"""FLOP counts: fvcore for the forward pass (1 multiply-add = 1 flop), FlopCounterMode for a
training step (2 flops per multiply-add, forward and backward).

fvcore skips any op it has no handle for. CBN's statistic gradients run as the registered op
cbn::conv_weight_grad (see cbn/ops.py), so a handle for it is registered here; FlopCounterMode
counts the same op with the formula cbn registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cbn.ops import conv_weight_grad_macs


def conv_weight_grad_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore's handle for cbn::conv_weight_grad(input, grad_output, weight, ...): the traced node's
    shapes into cbn.ops' formula (as fvcore's conv_flop_jit feeds conv_flop_count)."""
    from fvcore.nn.jit_handles import get_shape

    return conv_weight_grad_macs(get_shape(inputs[1]), get_shape(inputs[2]))


FVCORE_HANDLES = {"cbn::conv_weight_grad": conv_weight_grad_flop_jit}


def fvcore_forward_flops(model: torch.nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """Forward multiply-adds counted by fvcore, and the ops it had to skip (name -> count)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**FVCORE_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return int(analysis.total()), dict(analysis.unsupported_ops())


def counted_flops(fn: Callable[[], object]) -> int:
    """Flops of everything fn runs (forward and any backward inside it), 2 per multiply-add."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
