"""Algorithm 1 of the paper written literally, as an independent reference for the tests.

Keeps what the official code kept (past weights, dense Jacobians, nu rather than var) and evaluates
Eq. 7-12 term by term in whatever dtype it is given. Slow and memory-hungry on purpose. Besides
Eq. 10's clamp it knows the "drop" rule: a past entry whose compensated nu falls below mu^2 leaves
that channel's average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIMS = (0, 2, 3)


class ReferenceCBN:
    def __init__(self, conv: nn.Conv2d, window: int, burn_in: int = 0, eps: float = 1e-5, compensate: bool = True,
                 negative_variance: str = "clamp"):
        self.conv, self.window, self.burn_in, self.eps, self.compensate = conv, window, burn_in, eps, compensate
        self.negative_variance = negative_variance
        self.past: list[dict[str, Tensor]] = []  # most recent last
        self.negative = 0  # past (iteration, channel) entries whose compensated nu was below mu^2

    def _stats(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        x = F.conv2d(y, weight, bias, self.conv.stride, self.conv.padding, self.conv.dilation, self.conv.groups)
        return x.mean(DIMS), x.square().mean(DIMS)

    def __call__(self, y: Tensor, iteration: int) -> tuple[Tensor, Tensor, Tensor]:
        """Normalized conv(y) (no affine) and the (mean, var) it used, at iteration t."""
        w, b = self.conv.weight, self.conv.bias
        x = self.conv(y)
        mu, nu = x.mean(DIMS), x.square().mean(DIMS)
        mus, nus = [mu], [nu]
        for entry in self.past[-(self.window - 1):] if self.window > 1 else []:
            d_w = w.detach() - entry["weight"]
            d_mu = torch.einsum("jqpab,qpab->j", entry["jac_mu_w"], d_w)
            d_nu = torch.einsum("jqpab,qpab->j", entry["jac_nu_w"], d_w)
            if b is not None:
                d_b = b.detach() - entry["bias"]
                d_mu = d_mu + entry["jac_mu_b"] @ d_b
                d_nu = d_nu + entry["jac_nu_b"] @ d_b
            if not self.compensate:
                d_mu, d_nu = d_mu * 0, d_nu * 0
            mus.append(entry["mu"] + d_mu)  # Eq. 7
            nus.append(entry["nu"] + d_nu)  # Eq. 8
        mus, nus = torch.stack(mus), torch.stack(nus)
        below = nus < mus * mus
        below[0] = False  # the current batch's own statistics
        self.negative += int(below.sum())
        if self.negative_variance == "drop":  # the entry leaves its channel's window: mu and nu alike
            kept = (~below).to(mus.dtype)
            mu_bar = (mus * kept).sum(0) / kept.sum(0)
            nu_bar = (nus * kept).sum(0) / kept.sum(0)
        else:
            mu_bar = mus.mean(0)  # Eq. 9
            nu_bar = torch.maximum(nus, mus * mus).mean(0)  # Eq. 10
        var_bar = nu_bar - mu_bar * mu_bar  # Eq. 11
        out = (x - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + self.eps)  # Eq. 12
        if iteration >= self.burn_in and self.window > 1:
            self._record(y.detach(), mu.detach(), nu.detach())
        return out, mu_bar, var_bar

    def _record(self, y: Tensor, mu: Tensor, nu: Tensor) -> None:
        w = self.conv.weight.detach().clone()
        b = None if self.conv.bias is None else self.conv.bias.detach().clone()
        entry = {"mu": mu, "nu": nu, "weight": w}
        if b is None:
            entry["jac_mu_w"], entry["jac_nu_w"] = torch.func.jacrev(lambda w_: self._stats(y, w_, None))(w)
        else:
            (jmw, jmb), (jnw, jnb) = torch.func.jacrev(lambda w_, b_: self._stats(y, w_, b_), argnums=(0, 1))(w, b)
            entry.update(jac_mu_w=jmw, jac_mu_b=jmb, jac_nu_w=jnw, jac_nu_b=jnb, bias=b)
        self.past.append(entry)
