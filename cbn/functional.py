"""CBN's normalization as one autograd function on BatchNorm's own fused kernels.

Forward: this batch's mean and variance (one stats pass), combined with the past iterations'
compensated statistics (constants) into the window statistics of Eq. 9-11, then the output in one
pass of the inference batch-norm kernel. Backward, in closed form through the current statistics
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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def combine(mean: Tensor, var: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, int]:
    """Eq. 9-11: average the current statistics with the compensated past ones.

    var_bar = mean_j max(var_j, 0) + mean_j (mu_j - mu_bar)^2, which equals Eq. 10-11's
    mean_j max(nu_j, mu_j^2) - mu_bar^2 without its cancellation (the past var_j are clamped).
    """
    if past is None:
        return mean, var, 1
    past_mean, past_var = (p.to(mean.dtype) for p in past)
    entries = 1 + past_mean.shape[0]
    mean_bar = (mean + past_mean.sum(0)) / entries
    spread = (mean - mean_bar).square() + (past_mean - mean_bar).square().sum(0)
    var_bar = (var + past_var.sum(0) + spread) / entries
    return mean_bar, var_bar, entries


def _stats_input(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class CrossIterationNorm(torch.autograd.Function):
    """(x, gamma, beta, past_mean, past_var, eps) -> (y, mu, var, mu_bar, var_bar); only y is
    differentiable. past_* are (entries, C) or None; the statistics are float32 or float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, past_mean, past_var, eps):
        x_stats = _stats_input(x)
        mean, var = torch.batch_norm_update_stats(x_stats, None, None, 0.0)
        past = None if past_mean is None else (past_mean, past_var)
        mean_bar, var_bar, entries = combine(mean, var, past)
        out = F.batch_norm(x, mean_bar, var_bar, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, mean_bar, var_bar)
        ctx.entries, ctx.eps = entries, eps
        ctx.mark_non_differentiable(mean, var, mean_bar, var_bar)
        return out, mean, var, mean_bar, var_bar

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused):
        x, weight, mean, mean_bar, var_bar = ctx.saved_tensors
        n, eps = ctx.entries, ctx.eps
        x_stats, g = _stats_input(x), _stats_input(grad_out)
        m = x.numel() // x.shape[1]
        r = torch.rsqrt(var_bar + eps)
        gamma = torch.ones_like(r) if weight is None else weight.to(r.dtype)
        # One fused reduction: with save_mean = mu_bar and invstd = 1, BN's backward returns
        # sum(g * (x - mu_bar)) as its weight gradient and sum(g) as its bias gradient.
        _, g2, g1 = torch.ops.aten.native_batch_norm_backward(
            g, x_stats, torch.ones_like(r), None, None, mean_bar, torch.ones_like(r), True, eps, [False, True, True])
        d_mean_bar = -gamma * r * g1
        d_var_bar = -0.5 * gamma * r.pow(3) * g2
        d_mean = (d_mean_bar + d_var_bar * 2.0 * (mean - mean_bar)) / n
        d_var = d_var_bar / n
        # b (x - mu) + a in one pass: the inference batch-norm kernel with var = 1 - eps.
        a, b = d_mean / m, 2.0 * d_var / m
        grad_x = F.batch_norm(x_stats, mean, torch.full_like(r, 1.0 - eps), b, a, False, 0.0, eps)
        grad_x.addcmul_(g, (gamma * r).view(1, -1, 1, 1))
        grad_weight = None if weight is None else (r * g2).to(weight.dtype)
        grad_bias = None if weight is None else g1.to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None
