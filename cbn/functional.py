"""CBN's normalization as one autograd function on BatchNorm's own fused kernels.

Forward: this batch's mean and variance (BatchNorm's statistics kernel on CUDA, two plain
reductions on a CPU, where that kernel is slow), combined with the past iterations' compensated
statistics (constants) into the window statistics of Eq. 9-11, then the output in one pass of the
inference batch-norm kernel. Backward, in closed form through the current statistics
only (the past ones are constants), with one fused reduction and two elementwise passes. Written
as ops on (x, mu, var) it took about twice the memory passes of BatchNorm.

Backward derivation, per channel, with M positions, n window entries, r = (var_bar + eps)^-1/2,
G1 = sum(g) and G2 = sum(g * (x - mu_bar)):
    mu_bar = (mu + sum past mu) / n           d mu_bar / d mu  = 1 / n
    var_bar = (var + sum past var + sum_all (mu_j - mu_bar)^2) / n
                                              d var_bar / d var = 1 / n,  d var_bar / d mu = 2 (mu - mu_bar) / n
    dL/d mu_bar = -gamma r G1                 dL/d var_bar = -gamma r^3 G2 / 2
    dL/dx = gamma r g + (dL/d mu) / M + (dL/d var) 2 (x - mu) / M
    dL/d gamma = r G2                         dL/d beta = G1
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

REDUCE_DIMS = (0, 2, 3)  # an (N, C, H, W) tensor's dimensions other than its channels


def combine(mean: Tensor, var: Tensor, past: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor | int]:
    """Eq. 9-11: average the current statistics with the compensated past ones.

    past is (means, variances, weights) of the k-1 history slots, (k-1, C) each: a weight is 1 for
    an entry in the window and 0 for one outside it (an empty or invalid slot, or a dropped
    channel), whose mean and variance are 0. The entry count per channel is then 1 + sum(weights),
    computed on the device. var_bar = mean_j max(var_j, 0) + mean_j (mu_j - mu_bar)^2, which equals
    Eq. 10-11's mean_j max(nu_j, mu_j^2) - mu_bar^2 without its cancellation (the past var_j are
    clamped or dropped already).
    """
    if past is None:  # copies: torch.compile cannot wire one tensor returned and saved under two names
        return mean.clone(), var.clone(), 1
    past_mean, past_var, weights = (to_dtype(p, mean.dtype) for p in past)
    entries = torch.add(weights.sum(0), constant(1.0, mean.dtype))
    mean_bar = (mean + past_mean.sum(0)) / entries  # weight-0 entries hold zeros
    current, others = mean - mean_bar, past_mean - mean_bar
    spread = torch.mul(others * others, weights).sum(0).addcmul_(current, current)
    var_bar = (var + past_var.sum(0) + spread) / entries
    return mean_bar, var_bar, entries


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W). On a CPU two passes of plain
    reductions (below), compiled or not, so that a compiled step computes what the eager one does
    (CBN's compensation can amplify a rounding difference into a different training run); on CUDA
    BatchNorm's own one-pass kernel, or, under torch.compile, which has no fake kernel for it,
    var_mean, which inductor fuses."""
    if x.device.type == "cpu":
        return _two_pass_statistics(x)
    if torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=REDUCE_DIMS, correction=0)
        return mean, var
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _two_pass_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean, then the mean square of the centred input: as exact as a one-pass Welford update
    (no E[x^2] - E[x]^2 cancellation), and on a CPU 1.7-5.5x faster than BatchNorm's statistics
    kernel (torch 2.15, 2 threads: 0.12 ms against 0.66 ms at 4x64x56x56, 0.05 against 0.09 ms at
    4x512x7x7). The centred copy is a temporary the size of x."""
    inverse_count = constant(x.shape[1] / x.numel(), x.dtype)
    mean = x.sum(REDUCE_DIMS).mul_(inverse_count)
    centred = x - mean.view(-1, 1, 1)
    return mean, centred.mul_(centred).sum(REDUCE_DIMS).mul_(inverse_count)


def fusion_boundary(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors unchanged; under torch.compile, copied by an op that nothing fuses across.

    Inductor's partitioner will not recompute in the backward a node that a chain of fusible ops
    reaches from more than 100 nodes earlier in the forward (torch._functorch.config's
    ban_recompute_long_fusible_chains). The window's many small ops feed the normalization through
    such a chain, so after CBN, and not after BN, a following ReLU whose output nothing else keeps
    had its bool mask saved instead of recomputed, and on a CPU writing that mask cost more than
    the rest of the kernel. Ending the chain at the window statistics costs a copy of 2C numbers."""
    if torch.compiler.is_compiling():
        return tuple(_fusion_boundary_op(list(tensors)))
    return tensors


@torch.library.custom_op("cbn::fusion_boundary", mutates_args=())
def _fusion_boundary_op(tensors: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


@_fusion_boundary_op.register_fake
def _(tensors):
    return [torch.empty_like(t) for t in tensors]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of CBN's statistics and history for inputs of dtype: float64 for float64, else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _stats_input(x: Tensor) -> Tensor:
    return to_dtype(x, stats_dtype(x.dtype))


def constant(value: float | Tensor, dtype: torch.dtype) -> Tensor:
    """value as a 0-dim CPU tensor of dtype, made once per value. An op given a Python number wraps
    it in a tensor and converts that to the operand's dtype, four extra dispatches each time; a 0-dim
    CPU tensor enters an elementwise arithmetic op on any device as a scalar, with no copy and no
    synchronization (torch.where is the exception: it copies it to the device). (Under jit tracing,
    which fvcore uses, a value computed from shapes is a traced tensor: kept as it is.)"""
    return value if isinstance(value, Tensor) else cached(_constant, float(value), dtype)


def operand(value: float, like: Tensor) -> Tensor:
    """value as a 0-dim tensor of like's dtype that torch.where can take beside like: constant()
    on a CPU; elsewhere a tensor on like's device, since torch.where copies a CPU scalar tensor
    to the device with a host sync."""
    return constant(value, like.dtype) if like.device.type == "cpu" else like.new_full((), value)


@functools.lru_cache(maxsize=256)  # bounded: a multi-scale detector sees many position counts
def _constant(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _ones(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.ones(channels, dtype=dtype, device=device)


def capturing() -> bool:
    """Whether torch.jit.trace (fvcore) or torch.compile is recording the ops being run into a graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def cached(factory, *args) -> Tensor:
    """factory(*args) from its functools.lru_cache, except while torch.jit.trace (fvcore) or
    torch.compile records the ops being run: a tensor made during one capture must not be reused
    by another, so a capture makes its own."""
    return factory.__wrapped__(*args) if capturing() else factory(*args)


def to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without dispatching anything when it already is (Tensor.to dispatches even then)."""
    return t if t.dtype == dtype else t.to(dtype)


class CrossIterationNorm(torch.autograd.Function):
    """(x, gamma, beta, past_mean, past_var, past_weights, eps) -> (y, mu, var, mu_bar, var_bar,
    count), count being the window's examples per channel (n M); only y is differentiable. past_*
    are combine()'s past (means, variances, weights), or None; the statistics are float32 or
    float64. (Separate arguments, not a tuple: jit tracing, which fvcore uses, passes only
    top-level tensors.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, past_mean, past_var, past_weights, eps):
        mean, var = batch_statistics(_stats_input(x))
        past = None if past_mean is None else (past_mean, past_var, past_weights)
        mean_bar, var_bar, entries = combine(mean, var, past)
        mean_bar, var_bar = fusion_boundary(mean_bar, var_bar)
        positions = x.numel() // x.shape[1]
        count = entries * (positions if isinstance(entries, int) else constant(positions, mean.dtype))
        out = torch.native_batch_norm(x, weight, bias, mean_bar, var_bar, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight, mean_bar, var_bar)
        ctx.count, ctx.eps = count, eps
        ctx.set_materialize_grads(False)  # the statistics' (always None) gradients stay None
        ctx.mark_non_differentiable(mean, var, mean_bar, var_bar, *([count] if isinstance(count, Tensor) else []))
        return out, mean, var, mean_bar, var_bar, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused):
        if grad_out is None:  # y was not used; nothing flows back
            return None, None, None, None, None, None, None
        x, weight, mean_bar, var_bar = ctx.saved_tensors
        count, eps = ctx.count, ctx.eps
        x_stats, g = _stats_input(x), _stats_input(grad_out)
        r = torch.rsqrt(var_bar + constant(eps, var_bar.dtype))
        # One fused reduction: with save_mean = mu_bar and save_invstd = r, BN's backward returns
        # r * sum(g * (x - mu_bar)) = r G2, which is dL/d gamma, and G1 = sum(g), which is dL/d beta.
        _, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            g, x_stats, None, None, None, mean_bar, r, True, eps, [False, True, True])
        # With s = -gamma r / (n M) (n M = count): b = 2 dL/d var / M = s r^2 G2 and
        # a = dL/d mu / M = s G1 + b (mu - mu_bar); dL/dx = gamma r g + b (x - mu) + a
        #                 = b (x - mu_bar) + s G1 + gamma r g, per channel, in two passes. The first
        # is inference batch norm's kernel with mean mu_bar, variance 1, eps 0, weight b and bias
        # s G1: on a CPU 1.5-2.5x faster than an addcmul with two per-channel operands.
        gamma_r = r if weight is None else to_dtype(weight, r.dtype) * r
        s = gamma_r / -count
        b = s * r * grad_gamma
        unit = cached(_ones, mean_bar.shape[0], mean_bar.dtype, mean_bar.device)
        grad_x = torch.native_batch_norm(x_stats, b, s * grad_beta, mean_bar, unit, False, 0.0, 0.0)[0]
        grad_x.addcmul_(g, gamma_r.view(-1, 1, 1))
        grad_weight = None if weight is None else to_dtype(grad_gamma, weight.dtype)
        grad_bias = None if weight is None else to_dtype(grad_beta, weight.dtype)
        return to_dtype(grad_x, x.dtype), grad_weight, grad_bias, None, None, None, None
