"""Gradients of a convolution's output statistics with respect to its weight (paper Appendix B).

For x = conv(y, theta) + b with M = N*H'*W' output positions per channel, CBN needs the
per-channel mean mu_j = mean(x_j) and mean square nu_j = mean(x_j^2) and their gradients with
respect to the conv's own parameters, to compensate statistics of past iterations (Eq. 7-8).

Both paths below describe one past iteration by tensors ("fields") from which a linear form
L(theta, b) = (L_mu, L_nu) is evaluated, with dmu = L_mu(theta_t) - L_mu(theta_past) and likewise
for nu. L(theta_past) needs neither the past weights (the official code kept a copy per past step)
nor a stored value: mu and nu are homogeneous of degree 1 and 2 in (theta, b), so by Euler's
theorem L_mu(theta_past) = mu_past and L_nu(theta_past) = 2 nu_past, the recorded statistics.

* EfficientPath: d mu_j / d theta is zero off the diagonal j and the same (C_in/groups x K) patch
  mean for every output channel of a group, so it is stored once per group (C_in*K floats in all)
  and computed by a box filter over the batch-summed input (``patch_mean``). d nu_j / d theta_j
  comes from one weight-gradient convolution with grad_output = 2x/M. A bias adds d mu_j/d b_j = 1
  and d nu_j/d b_j = 2 mu_j. Cost: about one conv forward; memory: |W| + C_in*K.

* NaivePath: the dense Jacobians d mu/d theta and d nu/d theta (C_out x C_out x C_in/groups x K
  each) from torch.func.jacrev, contracted in full. O(C_out^2 * C_in * K) time and memory: the
  baseline Appendix B improves on, kept as a reference and for the benchmark.

Both evaluate their linear forms for a stack of S recorded iterations at once (``linear``), so the
layer compensates its whole window with the same few ops whatever the window size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbn.functional import cached, constant
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
        """Statistic gradients at the weights that produced x = conv(y); y and x in the stats dtype,
        weight in that dtype too (only its shape is read: x already carries the weights)."""
        del bias
        n, _, h, w = x.shape
        geo = [list(geometry.stride), list(geometry.padding), list(geometry.dilation), geometry.groups]
        # d nu / d theta = conv weight gradient with grad_output 2x/M: scale x or the result,
        # whichever is smaller (x in early layers, the weight in late ones).
        scale = constant(2.0 / (n * h * w), x.dtype)
        if x.numel() <= weight.numel():
            grad_sq = conv_weight_grad(y, x * scale, weight, *geo)
        else:
            grad_sq = conv_weight_grad(y, x, weight, *geo).mul_(scale)
        return {"grad_mean": patch_mean(y, geometry, (h, w)), "grad_sq": grad_sq}

    @staticmethod
    def linear(fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
        """(L_mu, L_nu) at (weight, bias), each (S, C), for S recorded iterations at once: fields
        are stacked (S, ...) and mean (S, C) holds their uncompensated means."""
        grad_mean, grad_sq = fields["grad_mean"], fields["grad_sq"]
        slots, groups = grad_mean.shape[:2]
        c_out = weight.shape[0]
        if groups == 1:  # one (S x K) @ (K x C) product
            lin_mean = torch.mm(grad_mean.view(slots, -1), weight.view(c_out, -1).transpose(0, 1))
        else:
            per_group = weight.view(groups, c_out // groups, -1)
            lin_mean = torch.einsum("sgk,gok->sgo", grad_mean.view(slots, groups, -1), per_group).reshape(slots, c_out)
        # Row-wise dot products of every slot with the current weight, as one batched product over
        # channels, (C, 1, K) @ (C, K, S), reading the history in place (each channel's K x S block
        # is a transposed matrix to BLAS). On a CPU 2.4x faster than a product-and-sum over an
        # (S, |W|) temporary, and 3.5x faster than (C, S, K) @ (C, K, 1).
        per_slot = grad_sq.view(slots, c_out, -1).permute(1, 2, 0)
        lin_sq = torch.bmm(weight.view(c_out, 1, -1), per_slot).view(c_out, slots).transpose(0, 1)
        if bias is not None:
            lin_mean = lin_mean + bias
            lin_sq = torch.addcmul(lin_sq, mean, bias, value=2.0)
        return lin_mean, lin_sq


def patch_mean(y: Tensor, geometry: ConvGeometry, out_hw: tuple[int, int]) -> Tensor:
    """d mu / d theta: the mean, over the conv's N*H'*W' output positions, of the input patch that
    each weight entry multiplies, per input channel, shaped (groups, C_in/groups, kh, kw).

    That is the conv's weight gradient for grad_output = 1/M, computed more cheaply: sum the input
    over the batch, then sum each kernel offset's strided grid of positions with one box filter, a
    conv of the (C_in, 1, H, W) sum with an all-1/M (H' x W') kernel dilated by the conv's stride
    and strided by its dilation. About N times fewer multiply-adds than the weight gradient, and
    two to three times faster on a CPU for ResNet's 3x3 layers."""
    _, c_in_per_group, kh, kw = geometry.weight_shape
    out_h, out_w = out_hw
    total = y.sum(0).unsqueeze(1)  # (C_in, 1, H, W)
    box = cached(_box, out_h, out_w, y.shape[0], y.dtype, y.device)
    sums = F.conv2d(total, box, padding=geometry.padding, stride=geometry.dilation, dilation=geometry.stride)
    # Only the first kh x kw offsets are kernel positions (the box output can run a row or more past).
    return sums[:, 0, :kh, :kw].contiguous().view(geometry.groups, c_in_per_group, kh, kw)


@functools.lru_cache(maxsize=64)
def _box(out_h: int, out_w: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """patch_mean's all-1/M kernel, made once per shape and device rather than filled every step
    (inference's eval mode never calls it; a few dozen shapes cover a multi-scale detector)."""
    return torch.full((1, 1, out_h, out_w), 1.0 / (n * out_h * out_w), dtype=dtype, device=device)


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
        """(L_mu, L_nu), each (S, C), for S stacked recorded iterations (see EfficientPath.linear)."""
        del mean  # the dense bias Jacobian already holds 2*mu on its diagonal
        slots, c_out = fields["jac_mean_weight"].shape[:2]
        flat = weight.reshape(-1)
        lin_mean = fields["jac_mean_weight"].reshape(slots, c_out, -1) @ flat
        lin_sq = fields["jac_sq_weight"].reshape(slots, c_out, -1) @ flat
        if bias is not None:
            lin_mean = lin_mean + fields["jac_mean_bias"] @ bias
            lin_sq = lin_sq + fields["jac_sq_bias"] @ bias
        return lin_mean, lin_sq


GRAD_PATHS = {"efficient": EfficientPath, "naive": NaivePath}


def linear_at(path, fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(L_mu, L_nu), each (C,), of one recorded iteration: path.linear on a stack of one."""
    one_slot = {name: value.view(1, *value.shape) for name, value in fields.items()}
    lin_mean, lin_sq = path.linear(one_slot, weight, bias, mean.view(1, -1))
    return lin_mean.view(-1), lin_sq.view(-1)

