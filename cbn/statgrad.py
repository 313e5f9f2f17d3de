"""Gradients of a convolution's output statistics with respect to its weight (paper Appendix B).

For x = conv(y, theta) + b with M = N*H'*W' output positions per channel, CBN needs the
per-channel mean mu_j = mean(x_j) and mean square nu_j = mean(x_j^2) and their gradients with
respect to the conv's own parameters, to compensate statistics of past iterations (Eq. 7-8).

Both paths below describe one past iteration by tensors ("fields") from which a linear form
L(theta, b) = (L_mu, L_nu) is evaluated, with dmu = L_mu(theta_t) - L_mu(theta_past) and likewise
for nu. The layer stores L(theta_past) as an offset when it records the iteration, so it never
keeps a copy of the past weights (the official code kept one per past step).

* EfficientPath: d mu_j / d theta is zero off the diagonal j and the same (C_in/groups x K) patch
  mean for every output channel of a group, so it is stored once per group (C_in*K floats in all).
  d nu_j / d theta_j comes from one weight-gradient convolution with grad_output = 2x/M. A bias adds
  d mu_j/d b_j = 1 and d nu_j/d b_j = 2 mu_j. Cost: about one conv forward; memory: |W| + C_in*K.
* NaivePath: the dense Jacobians d mu/d theta and d nu/d theta (C_out x C_out x C_in/groups x K
  each) from torch.func.jacrev, contracted in full. O(C_out^2 * C_in * K) time and memory: the
  baseline Appendix B improves on, kept as a reference and for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbn.ops import conv_weight_grad

_REDUCE_DIMS = (0, 2, 3)


@dataclass(frozen=True)
class ConvGeometry:
    """What the statistic gradients need to know about the conv that feeds a CBN layer."""

    weight_shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    has_bias: bool

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        # From the module's int attributes, not weight.shape: under jit tracing shapes are traced
        # values, which the op's int[] arguments do not accept.
        return cls(
            weight_shape=(conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size),
            stride=tuple(conv.stride),
            padding=tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            has_bias=conv.bias is not None,
        )

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


class EfficientPath:
    """Closed-form diagonal statistic gradients (Appendix B)."""

    name = "efficient"

    @staticmethod
    def field_shapes(geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
        c_out, c_in_per_group, kh, kw = geometry.weight_shape
        return {
            "grad_mean": (geometry.groups, c_in_per_group, kh, kw),
            "grad_sq": (c_out, c_in_per_group, kh, kw),
        }

    @staticmethod
    def compute(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> dict[str, Tensor]:
        """Statistic gradients at the weights that produced x = conv(y); y and x in the stats dtype."""
        del weight, bias  # x already carries them
        n, _, h, w = x.shape
        m = n * h * w
        geo = [list(geometry.stride), list(geometry.padding), list(geometry.dilation), geometry.groups]
        groups = geometry.groups
        _, c_in_per_group, kh, kw = geometry.weight_shape
        # One output channel per group with grad_output = 1/M: the patch mean of each group.
        ones = x.new_full((n, groups, h, w), 1.0 / m)
        grad_mean = conv_weight_grad(y, ones, [groups, c_in_per_group, kh, kw], *geo)
        grad_sq = conv_weight_grad(y, x * (2.0 / m), list(geometry.weight_shape), *geo)
        return {"grad_mean": grad_mean, "grad_sq": grad_sq}

    @staticmethod
    def linear(fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
        """(L_mu, L_nu) at (weight, bias); mean is the uncompensated mean of the recorded iteration."""
        grad_mean, grad_sq = fields["grad_mean"], fields["grad_sq"]
        c_out, groups = weight.shape[0], grad_mean.shape[0]
        per_group = weight.reshape(groups, c_out // groups, -1)
        lin_mean = torch.einsum("gk,gok->go", grad_mean.reshape(groups, -1), per_group).reshape(c_out)
        # Row-wise dot products: a batched (1 x K) @ (K x 1) per channel, with no |W| temporary.
        lin_sq = torch.einsum("ck,ck->c", grad_sq.reshape(c_out, -1), weight.reshape(c_out, -1))
        if bias is not None:
            lin_mean = lin_mean + bias
            lin_sq = lin_sq + 2.0 * mean * bias
        return lin_mean, lin_sq


class NaivePath:
    """Dense Jacobians from torch.func.jacrev: the O(C^2 * C_in * K) reference."""

    name = "naive"

    @staticmethod
    def field_shapes(geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
        c_out = geometry.weight_shape[0]
        shapes = {
            "jac_mean_weight": (c_out, *geometry.weight_shape),
            "jac_sq_weight": (c_out, *geometry.weight_shape),
        }
        if geometry.has_bias:
            shapes["jac_mean_bias"] = (c_out, c_out)
            shapes["jac_sq_bias"] = (c_out, c_out)
        return shapes

    @staticmethod
    def compute(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> dict[str, Tensor]:
        """Dense Jacobians at (weight, bias); x is not needed, the conv is re-run under jacrev."""
        del x
        kwargs = geometry.conv_kwargs()

        def stats(w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            out = F.conv2d(y, w, b, **kwargs)
            return out.mean(_REDUCE_DIMS), out.square().mean(_REDUCE_DIMS)

        if bias is None:
            jac_mean_w, jac_sq_w = torch.func.jacrev(lambda w: stats(w, None))(weight)
            return {"jac_mean_weight": jac_mean_w, "jac_sq_weight": jac_sq_w}
        (jac_mean_w, jac_mean_b), (jac_sq_w, jac_sq_b) = torch.func.jacrev(stats, argnums=(0, 1))(weight, bias)
        return {
            "jac_mean_weight": jac_mean_w,
            "jac_sq_weight": jac_sq_w,
            "jac_mean_bias": jac_mean_b,
            "jac_sq_bias": jac_sq_b,
        }

    @staticmethod
    def linear(fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
        del mean  # the dense bias Jacobian already holds 2*mu on its diagonal
        c_out = weight.shape[0]
        flat = weight.reshape(-1)
        lin_mean = fields["jac_mean_weight"].reshape(c_out, -1) @ flat
        lin_sq = fields["jac_sq_weight"].reshape(c_out, -1) @ flat
        if bias is not None:
            lin_mean = lin_mean + fields["jac_mean_bias"] @ bias
            lin_sq = lin_sq + fields["jac_sq_bias"] @ bias
        return lin_mean, lin_sq


GRAD_PATHS = {"efficient": EfficientPath, "naive": NaivePath}

