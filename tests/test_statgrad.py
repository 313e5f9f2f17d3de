"""The efficient statistic gradients against torch.func.jacrev, and the two paths' linear forms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from cbn.ops import row_dots
from cbn.statgrad import ConvGeometry, EfficientPath, NaivePath, linear_at

CONVS = {
    "1x1": dict(c_in=5, c_out=4, kernel_size=1),
    "3x3": dict(c_in=4, c_out=6, kernel_size=3, padding=1),
    "5x3": dict(c_in=3, c_out=4, kernel_size=(5, 3), padding=(2, 1)),
    "stride2": dict(c_in=4, c_out=4, kernel_size=3, stride=2),
    "dilation2": dict(c_in=4, c_out=5, kernel_size=3, padding=2, dilation=2),
    "strided-dilated-padded": dict(c_in=3, c_out=4, kernel_size=3, stride=2, padding=3, dilation=2),
    "grouped": dict(c_in=6, c_out=4, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(c_in=4, c_out=4, kernel_size=3, padding=1, groups=4),
    # fewer outputs than weights (2x16x5x6 < 16x16x3x3): d nu/d theta scales x; the others scale its result
    "wide-strided": dict(c_in=16, c_out=16, kernel_size=3, stride=2, padding=1),
}


def make_conv(spec: dict, bias: bool) -> nn.Conv2d:
    spec = dict(spec)
    return nn.Conv2d(spec.pop("c_in"), spec.pop("c_out"), bias=bias, **spec).double()


def jacobians(conv: nn.Conv2d, y: torch.Tensor):
    geometry = ConvGeometry.of(conv)
    return NaivePath.compute(y, None, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), geometry)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", list(CONVS))
def test_efficient_gradients_equal_jacrev_diagonal(name, bias):
    conv = make_conv(CONVS[name], bias)
    y = torch.randn(2, conv.in_channels, 9, 11, dtype=torch.float64)
    x = conv(y).detach()
    fields = EfficientPath.compute(y, x, conv.weight.detach(), None, ConvGeometry.of(conv))
    jac = jacobians(conv, y)
    c_out = conv.out_channels
    diag = torch.arange(c_out)
    group_of = diag // (c_out // conv.groups)
    # the fields keep a row per group and channel: the Jacobian's diagonal, flattened the same way
    assert_close(fields["grad_mean"][group_of], jac["jac_mean_weight"][diag, diag].flatten(1), rtol=0, atol=1e-13)
    assert_close(fields["grad_sq"], jac["jac_sq_weight"][diag, diag].flatten(1), rtol=0, atol=1e-12)
    # Everything off the diagonal is exactly zero: that is what makes the efficient path possible.
    off = jac["jac_mean_weight"].clone()
    off[diag, diag] = 0
    assert off.abs().max() == 0
    off = jac["jac_sq_weight"].clone()
    off[diag, diag] = 0
    assert off.abs().max() == 0


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", ["3x3", "stride2", "strided-dilated-padded", "grouped"])
def test_linear_forms_give_the_dense_first_order_change(name, bias):
    """L(theta_t) - L(theta_past) equals J . (theta_t - theta_past) for both paths, bias included."""
    conv = make_conv(CONVS[name], bias)
    y = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.float64)
    x = conv(y).detach()
    w0 = conv.weight.detach()
    b0 = None if conv.bias is None else conv.bias.detach()
    w1 = w0 + 0.01 * torch.randn_like(w0)
    b1 = None if b0 is None else b0 + 0.01 * torch.randn_like(b0)
    mean = x.mean((0, 2, 3))
    geometry = ConvGeometry.of(conv)
    dense = NaivePath.compute(y, x, w0, b0, geometry)
    expected_mu = torch.einsum("jqpab,qpab->j", dense["jac_mean_weight"], w1 - w0)
    expected_nu = torch.einsum("jqpab,qpab->j", dense["jac_sq_weight"], w1 - w0)
    if bias:
        expected_mu = expected_mu + (b1 - b0)  # d mu_j / d b_j = 1
        expected_nu = expected_nu + 2 * mean * (b1 - b0)  # d nu_j / d b_j = 2 mu_j
    for path in (EfficientPath, NaivePath):
        fields = path.compute(y, x, w0, b0, geometry)
        mu1, nu1 = linear_at(path, fields, w1, b1, mean)
        mu0, nu0 = linear_at(path, fields, w0, b0, mean)
        assert_close(mu1 - mu0, expected_mu, rtol=1e-10, atol=1e-12)
        assert_close(nu1 - nu0, expected_nu, rtol=1e-10, atol=1e-12)


def test_first_order_term_predicts_the_statistics_under_new_weights():
    """The compensation is a Taylor step: its error shrinks quadratically with the weight change."""
    conv = make_conv(CONVS["3x3"], bias=True)
    y = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.float64)
    w0, b0 = conv.weight.detach(), conv.bias.detach()
    x0 = conv(y).detach()
    mean0 = x0.mean((0, 2, 3))
    fields = EfficientPath.compute(y, x0, w0, b0, ConvGeometry.of(conv))
    errors = []
    direction_w, direction_b = torch.randn_like(w0), torch.randn_like(b0)
    for step in (1e-2, 1e-3):
        w1, b1 = w0 + step * direction_w, b0 + step * direction_b
        x1 = F.conv2d(y, w1, b1, padding=1)
        mu1, nu1 = linear_at(EfficientPath, fields, w1, b1, mean0)
        mu0, nu0 = linear_at(EfficientPath, fields, w0, b0, mean0)
        predicted_nu = x0.square().mean((0, 2, 3)) + nu1 - nu0
        assert_close(mean0 + mu1 - mu0, x1.mean((0, 2, 3)), rtol=0, atol=1e-12)  # the mean is linear: exact
        errors.append((predicted_nu - x1.square().mean((0, 2, 3))).abs().max().item())
    assert errors[1] < errors[0] / 50  # second order: 10x smaller step, ~100x smaller error


@pytest.mark.parametrize("path", [EfficientPath, NaivePath])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", ["3x3", "strided-dilated-padded", "grouped"])
def test_linear_forms_at_the_recording_weights_are_mu_and_twice_nu(path, name, bias):
    """Euler's theorem (mu and nu are homogeneous of degree 1 and 2 in weight and bias), which is
    why the layer keeps no offsets: it compensates with L(theta_t) - (mu, 2 nu)."""
    conv = make_conv(CONVS[name], bias)
    y = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.float64)
    x = conv(y).detach()
    w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    mean = x.mean((0, 2, 3))
    mu, nu = linear_at(path, path.compute(y, x, w, b, ConvGeometry.of(conv)), w, b, mean)
    assert_close(mu, mean, rtol=1e-12, atol=1e-12)
    assert_close(nu, 2 * x.square().mean((0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", [EfficientPath, NaivePath])
def test_stacked_slots_give_each_slots_own_linear_form(path):
    """The layer evaluates all past slots in one call; each row equals that slot evaluated alone."""
    conv = make_conv(CONVS["grouped"], True)
    geometry = ConvGeometry.of(conv)
    w, b = conv.weight.detach(), conv.bias.detach()
    slots = []
    for seed in range(3):
        y = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        x = conv(y).detach()
        slots.append((path.compute(y, x, w, b, geometry), x.mean((0, 2, 3))))
    stacked = {f: torch.stack([fields[f] for fields, _ in slots]) for f in slots[0][0]}
    means = torch.stack([mean for _, mean in slots])
    w1 = w + 0.01 * torch.randn_like(w)
    mu, nu = path.linear(stacked, w1, b, means)
    for s, (fields, mean) in enumerate(slots):
        mu_s, nu_s = linear_at(path, fields, w1, b, mean)
        assert_close(mu[s], mu_s, rtol=1e-12, atol=1e-12)
        assert_close(nu[s], nu_s, rtol=1e-12, atol=1e-12)


def test_row_dots_are_each_channels_weight_row_against_each_slot():
    weight, rows = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    assert_close(row_dots(weight, rows), torch.einsum("ck,sck->sc", weight, rows))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cbn_ops_fake_kernels_match_their_outputs(channels_last):
    """torch.compile passes conv_weight_grad its operands in whatever layout inductor chose
    (flexible_layout) and trusts the fake kernels' output strides: a channels_last input once made
    aten return a channels_last gradient where the fake said contiguous."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(2, 4, 9, 9).to(memory_format=layout)
    weight = torch.randn(6, 4, 3, 3).to(memory_format=layout)
    x = F.conv2d(y, weight, padding=1)
    torch.library.opcheck(torch.ops.cbn.conv_weight_grad, (y, x, weight, [1, 1], [1, 1], [1, 1], 1))
    torch.library.opcheck(torch.ops.cbn.row_dots, (torch.randn(6, 36), torch.randn(3, 6, 36)))
    torch.library.opcheck(torch.ops.cbn.fusion_boundary, ([torch.randn(6), torch.randn(3, 6).t()],))
