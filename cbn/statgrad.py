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
  and computed by two small products over the batch-summed input (``patch_mean``). d nu_j / d theta_j
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbn.functional import REDUCE_DIMS, cached, constant
from cbn.ops import row_dots, weight_grad


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
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r}: CBN needs the conv's integer padding")
        kh, kw = conv.kernel_size
        return cls(
            weight_shape=(conv.out_channels, conv.in_channels // conv.groups, kh, kw),
            stride=(conv.stride[0], conv.stride[1]),
            padding=(int(conv.padding[0]), int(conv.padding[1])),
            dilation=(conv.dilation[0], conv.dilation[1]),
            groups=conv.groups,
            has_bias=conv.bias is not None,
        )

    @property
    def patch_size(self) -> int:
        """C_in/groups * kh * kw: the weights of one output channel."""
        _, c_in_per_group, kh, kw = self.weight_shape
        return c_in_per_group * kh * kw

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


@dataclass(frozen=True)
class HistoryField:
    """One tensor a gradient path keeps per recorded iteration: its name (the layer's buffer is
    ``history_<name>``) and its shape for a conv; ``bias_only`` fields exist for convs with a bias."""

    name: str
    shape: Callable[[ConvGeometry], tuple[int, ...]]
    bias_only: bool = False


def field_shapes(fields: tuple[HistoryField, ...], geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
    """The fields a conv of this geometry needs, by name, with their shapes (one recorded iteration)."""
    return {f.name: f.shape(geometry) for f in fields if geometry.has_bias or not f.bias_only}


class EfficientPath:
    """Closed-form diagonal statistic gradients (Appendix B)."""

    name = "efficient"
    # Flattened to a row per group or channel: a 4-D or 5-D buffer would be converted (and refused)
    # by module.to(memory_format=torch.channels_last).
    fields = (
        HistoryField("grad_mean", lambda g: (g.groups, g.patch_size)),  # d mu / d theta, one per group
        HistoryField("grad_sq", lambda g: (g.weight_shape[0], g.patch_size)),  # d nu_j / d theta_j, the diagonal
    )

    @staticmethod
    def field_shapes(geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
        return field_shapes(EfficientPath.fields, geometry)

    @staticmethod
    def compute(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry,
                out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Statistic gradients at the weights that produced x = conv(y); y and x in the stats dtype,
        weight in that dtype too (only its shape is read: x already carries the weights). Written
        into out's tensors (the layer passes its history slot) when given, else into new ones."""
        del bias
        if out is None:
            out = {name: x.new_empty(shape) for name, shape in EfficientPath.field_shapes(geometry).items()}
        n, _, h, w = x.shape
        # d nu / d theta = conv weight gradient with grad_output 2x/M, scaled as it is written out
        # (one pass over the |W|-sized result, which the copy into the history would make anyway).
        grad = weight_grad(y, x, weight, list(geometry.stride), list(geometry.padding), list(geometry.dilation),
                           geometry.groups)
        torch.mul(grad, constant(2.0 / (n * h * w), x.dtype), out=out["grad_sq"].view(grad.shape))
        out["grad_mean"].view(geometry.groups, *geometry.weight_shape[1:]).copy_(patch_mean(y, geometry, (h, w)))
        return out

    @staticmethod
    def linear(fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
        """(L_mu, L_nu) at (weight, bias), each (S, C), for S recorded iterations at once: fields
        are stacked (S, ...) and mean (S, C) holds their uncompensated means."""
        grad_mean, grad_sq = fields["grad_mean"], fields["grad_sq"]
        slots, groups = grad_mean.shape[:2]
        c_out = weight.shape[0]
        if groups == 1:  # one (C x K) @ (K x S) product, transposed: on a CPU 1.6x faster than (S x K) @ (K x C)
            lin_mean = torch.mm(weight.view(c_out, -1), grad_mean.view(slots, -1).transpose(0, 1)).transpose(0, 1)
        else:
            per_group = weight.view(groups, c_out // groups, -1)
            lin_mean = torch.einsum("sgk,gok->sgo", grad_mean.view(slots, groups, -1), per_group).reshape(slots, c_out)
        lin_sq = row_dots(weight, grad_sq)  # each channel's weights against its row of every slot
        if bias is not None:
            lin_mean = lin_mean + bias
            lin_sq = torch.addcmul(lin_sq, mean, bias, value=2.0)
        return lin_mean, lin_sq


def patch_mean(y: Tensor, geometry: ConvGeometry, out_hw: tuple[int, int]) -> Tensor:
    """d mu / d theta: the mean, over the conv's N*H'*W' output positions, of the input patch that
    each weight entry multiplies, per input channel, shaped (groups, C_in/groups, kh, kw).

    That is the conv's weight gradient for grad_output = 1/M, computed more cheaply: sum the input
    over the batch, then, since the positions kernel offset (i, j) reads form a grid (rows R_i x
    columns C_j), sum them with two small products, P[c] = S_rows @ total[c] @ S_cols, where
    S_rows[i, h] = 1 if row h is in R_i (likewise S_cols, which also holds 1/M). The sum over the
    batch is the one pass over y. On a CPU 1.2-5x faster per layer than a box-filter convolution of
    the batch sum (2.3x summed over ResNet-18's layers), and N times fewer multiply-adds than the
    weight gradient."""
    _, c_in_per_group, kh, kw = geometry.weight_shape
    n, c_in, h, w = y.shape
    rows, columns = cached(_grid_selectors, (kh, kw), geometry.stride, geometry.padding, geometry.dilation, (h, w),
                           out_hw, n, y.dtype, y.device)
    by_column = torch.mm(y.sum(0).reshape(c_in * h, w), columns)  # (C_in * H, kw)
    sums = torch.bmm(rows.expand(c_in, kh, h), by_column.view(c_in, h, kw))  # (C_in, kh, kw)
    return sums.view(geometry.groups, c_in_per_group, kh, kw)


@functools.lru_cache(maxsize=64)
def _grid_selectors(kernel_hw: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int], n: int,
                    dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """patch_mean's (kh, H) row selector and (W, kw) column selector, the latter scaled by 1/M, made
    once per shape and device (inference's eval mode never calls it; a few dozen shapes cover a
    multi-scale detector)."""
    rows, columns = (_selector(kernel_hw[i], in_hw[i], out_hw[i], stride[i], padding[i], dilation[i], dtype, device)
                     for i in (0, 1))
    return rows, columns.t().mul(1.0 / (n * out_hw[0] * out_hw[1])).contiguous()


def _selector(kernel: int, size: int, positions: int, stride: int, padding: int, dilation: int, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """(kernel, size): 1 where input index h is read by kernel offset i at one of the output
    positions a, h = i * dilation - padding + a * stride (an index in the padding reads a zero)."""
    offsets = torch.arange(kernel, device=device).view(-1, 1, 1) * dilation - padding
    reads = offsets + stride * torch.arange(positions, device=device).view(1, -1, 1)
    return (reads == torch.arange(size, device=device)).any(1).to(dtype)


class NaivePath:
    """Dense Jacobians from torch.func.jacrev: the O(C^2 * C_in * K) reference."""

    name = "naive"
    fields = (  # dense Jacobians: every output channel's statistic against every parameter
        HistoryField("jac_mean_weight", lambda g: (g.weight_shape[0], *g.weight_shape)),
        HistoryField("jac_sq_weight", lambda g: (g.weight_shape[0], *g.weight_shape)),
        HistoryField("jac_mean_bias", lambda g: (g.weight_shape[0], g.weight_shape[0]), bias_only=True),
        HistoryField("jac_sq_bias", lambda g: (g.weight_shape[0], g.weight_shape[0]), bias_only=True),
    )

    @staticmethod
    def field_shapes(geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
        return field_shapes(NaivePath.fields, geometry)

    @staticmethod
    def compute(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry,
                out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Dense Jacobians at (weight, bias); x is not needed, the conv is re-run under jacrev.
        Copied into out's tensors when given (see EfficientPath.compute)."""
        del x
        kwargs = geometry.conv_kwargs()

        def stats(w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            conv_out = F.conv2d(y, w, b, **kwargs)
            return conv_out.mean(REDUCE_DIMS), conv_out.square().mean(REDUCE_DIMS)

        if bias is None:
            jac_mean_w, jac_sq_w = torch.func.jacrev(lambda w: stats(w, None))(weight)
            fields = {"jac_mean_weight": jac_mean_w, "jac_sq_weight": jac_sq_w}
        else:
            (jac_mean_w, jac_mean_b), (jac_sq_w, jac_sq_b) = torch.func.jacrev(stats, argnums=(0, 1))(weight, bias)
            fields = {"jac_mean_weight": jac_mean_w, "jac_sq_weight": jac_sq_w,
                      "jac_mean_bias": jac_mean_b, "jac_sq_bias": jac_sq_b}
        if out is None:
            return fields
        for name, value in fields.items():
            out[name].copy_(value)
        return out

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


class GradPath(Protocol):
    """What the layer asks of a statistic-gradient path; EfficientPath and NaivePath (the classes
    themselves) implement it."""

    name: str

    @property
    def fields(self) -> tuple[HistoryField, ...]:
        """The one definition of what a recorded iteration keeps."""
        ...

    def field_shapes(self, geometry: ConvGeometry) -> dict[str, tuple[int, ...]]:
        """The fields a conv of this geometry needs (``field_shapes(fields, geometry)``)."""
        ...

    def compute(self, y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry,
                out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The fields of the iteration whose conv mapped y to x with (weight, bias)."""
        ...

    def linear(self, fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None,
               mean: Tensor) -> tuple[Tensor, Tensor]:
        """(L_mu, L_nu) at (weight, bias), each (S, C), for S stacked recorded iterations."""
        ...


GRAD_PATHS: dict[str, GradPath] = {"efficient": EfficientPath, "naive": NaivePath}


def linear_at(path: GradPath, fields: dict[str, Tensor], weight: Tensor, bias: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(L_mu, L_nu), each (C,), of one recorded iteration: path.linear on a stack of one."""
    one_slot = {name: value.view(1, *value.shape) for name, value in fields.items()}
    lin_mean, lin_sq = path.linear(one_slot, weight, bias, mean.view(1, -1))
    return lin_mean.view(-1), lin_sq.view(-1)

