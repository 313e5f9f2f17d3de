"""CrossIterationBatchNorm2d numerics: BN equivalence, the paper's Algorithm 1, eval mode, AMP."""

import copy

import pytest
import torch
from helpers import batches, cbn_layers, conv_cbn_net, train
from reference_cbn import ReferenceCBN
from torch import nn
from torch.testing import assert_close

import cbn


def bn_net_like(net: nn.Module) -> nn.Sequential:
    """The same network with nn.BatchNorm2d, same initial weights."""
    bn_net = nn.Sequential(*(
        nn.BatchNorm2d(m.num_features, momentum=m.momentum) if isinstance(m, cbn.CrossIterationBatchNorm2d) else copy.deepcopy(m)
        for m in net
    ))
    bn_net.load_state_dict(net.state_dict(), strict=False)
    return bn_net


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-3), (torch.float64, 1e-9)], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_batch_statistics_have_no_cancellation(dtype, rtol, layout):
    """The CPU statistics (two passes of plain reductions) agree with BatchNorm's kernel and with
    float64 on data whose mean is 1e5 times its spread, where E[x^2] - E[x]^2 in float32 would
    leave no correct digit of the variance."""
    from cbn.functional import batch_statistics

    x = (torch.randn(3, 5, 7, 6, dtype=torch.float64) * 0.01 + 1e3).to(dtype).contiguous(memory_format=layout)
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    mean, var = batch_statistics(x)
    assert mean.dtype == var.dtype == dtype
    assert_close(mean.double(), exact_mean, rtol=rtol, atol=0)
    assert_close(var.double(), exact_var, rtol=rtol, atol=0)
    kernel_mean, kernel_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    assert_close(var, kernel_var, rtol=rtol, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("window, burn_in", [(1, 0), (4, 100)], ids=["k=1", "in-burn-in"])
def test_window_one_matches_batchnorm(window, burn_in, momentum):
    net = conv_cbn_net(window=window, burn_in=burn_in)
    for layer in cbn_layers(net):
        layer.momentum = momentum
    bn_net = bn_net_like(net)
    inputs = batches(4)
    x = inputs[0].clone().requires_grad_()
    x_bn = inputs[0].clone().requires_grad_()
    out, out_bn = net(x), bn_net(x_bn)
    assert_close(out, out_bn, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_bn.square().sum().backward()
    assert_close(x.grad, x_bn.grad, rtol=1e-4, atol=1e-5)
    for p, p_bn in zip(net.parameters(), bn_net.parameters()):
        assert_close(p.grad, p_bn.grad, rtol=1e-4, atol=1e-5)
    net.zero_grad()
    bn_net.zero_grad()
    outs, outs_bn = train(net, inputs[1:]), train(bn_net, inputs[1:])
    for a, b in zip(outs, outs_bn):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    for layer, bn in zip(cbn_layers(net), [m for m in bn_net if isinstance(m, nn.BatchNorm2d)]):
        assert_close(layer.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        assert_close(layer.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
        assert layer.num_batches_tracked == bn.num_batches_tracked


@pytest.mark.parametrize("bias", [True, False], ids=["conv-bias", "no-bias"])
@pytest.mark.parametrize("compensate, rule", [(True, "clamp"), (True, "drop"), (False, "clamp")],
                         ids=["cbn", "cbn-drop", "naive-cbn"])
@pytest.mark.parametrize("grad_path", ["efficient", "naive"])
def test_matches_algorithm_1_of_the_paper(grad_path, compensate, rule, bias):
    """Outputs, used statistics and conv gradients equal a literal float64 Algorithm 1, step by step,
    under either negative-variance rule; at this learning rate most compensated variances go
    negative, and the layer counts exactly the entries the reference finds below mu^2."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias).double()
    layer = cbn.CrossIterationBatchNorm2d(4, affine=False, momentum=1.0, window=3, burn_in=1, grad_path=grad_path,
                                          compensate=compensate, negative_variance=rule).double().bind(conv)
    reference = ReferenceCBN(conv, window=3, burn_in=1, eps=layer.eps, compensate=compensate, negative_variance=rule)
    opt = torch.optim.SGD(conv.parameters(), lr=0.2, momentum=0.9)
    for t, y in enumerate(batches(7, shape=(2, 3, 9, 9), dtype=torch.float64)):
        ref_out, ref_mean, ref_var = reference(y, t)
        ref_grad = torch.autograd.grad(ref_out.square().mean() + ref_out.mean(), conv.weight)[0]
        out = layer(conv(y))
        (out.square().mean() + out.mean()).backward()
        assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
        assert_close(conv.weight.grad, ref_grad, rtol=1e-9, atol=1e-11)
        assert_close(layer.running_mean, ref_mean, rtol=1e-10, atol=1e-12)  # momentum 1: the used stats
        n = layer.window_entries * 2 * 5 * 5
        if rule == "clamp":  # with "drop" the entries and example count differ per channel (test below)
            assert_close(layer.running_var * (n - 1) / n, ref_var, rtol=1e-9, atol=1e-12)
            assert layer.window_entries == min(3, max(1, t - 1 + 1)) if t >= 1 else 1
        assert layer.negative_variances == reference.negative
        opt.step()
        opt.zero_grad()
    assert (reference.negative > 0) == compensate
    assert layer.compensated_entries == (4 * (1 + 2 + 2 + 2 + 2) if compensate else 0)  # slots x channels


def one_slot_compensated_below_zero(rule: str) -> tuple[cbn.CrossIterationBatchNorm2d, torch.Tensor, torch.Tensor]:
    """A window of 2 whose one past entry compensates below zero in channel 0 only: between the
    steps channel 0's filter flips sign, so its compensated mean square is L_nu(-W) - nu = -3 nu
    while the other channels' weights, and so their compensated statistics, stay exact. Returns the
    layer after the second step and that step's batch statistics (conv output)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False).double()
    layer = cbn.CrossIterationBatchNorm2d(3, affine=False, momentum=1.0, window=2, negative_variance=rule).double().bind(conv)
    first, second = batches(2, shape=(2, 3, 6, 6), dtype=torch.float64)
    layer(conv(first)).sum().backward()
    with torch.no_grad():
        conv.weight[0].neg_()  # an in-place update: the next call is a new iteration
    x = conv(second)
    layer(x).sum().backward()
    return layer, x.detach(), conv(first).detach()


@pytest.mark.parametrize("rule", ["clamp", "drop"])
def test_a_slot_compensated_below_zero_is_clamped_or_dropped(rule):
    """clamp keeps the entry's (compensated) mean and counts its variance as 0; drop removes the
    entry from that channel's window, mean and variance alike; the other channels are untouched."""
    layer, x, past = one_slot_compensated_below_zero(rule)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    past_mean, past_var = past.mean((0, 2, 3)), past.var((0, 2, 3), unbiased=False)  # under the current weights
    used_mean, used_var = layer.running_mean, layer.running_var  # momentum 1: the window statistics (unbiased)
    count = torch.tensor([1.0 if rule == "drop" else 2.0, 2.0, 2.0], dtype=torch.float64) * x[:, 0].numel()
    both_mean = (mean + past_mean) / 2
    both_var = (var + past_var + (mean - both_mean) ** 2 + (past_mean - both_mean) ** 2) / 2
    assert_close(used_mean[1:], both_mean[1:], rtol=1e-12, atol=1e-12)
    assert_close(used_var[1:] * (count[1:] - 1) / count[1:], both_var[1:], rtol=1e-10, atol=1e-12)
    if rule == "drop":
        assert_close(used_mean[0], mean[0], rtol=1e-12, atol=1e-12)
        assert_close(used_var[0] * (count[0] - 1) / count[0], var[0], rtol=1e-10, atol=1e-12)
    else:  # the mean is linear in W, so compensated exactly: channel 0's past mean is -mu_past = mu under -W
        clamped_var = (var + 0.0 + (mean - both_mean) ** 2 + (past_mean - both_mean) ** 2) / 2
        assert_close(used_mean[0], both_mean[0], rtol=1e-12, atol=1e-12)
        assert_close(used_var[0] * (count[0] - 1) / count[0], clamped_var[0], rtol=1e-10, atol=1e-12)
    weights = layer.past_statistics[2]
    assert weights.tolist() == [[0.0 if rule == "drop" else 1.0, 1.0, 1.0]]
    assert (int(layer.negative_variances), int(layer.compensated_entries)) == (1, 3)
    assert cbn.negative_variance_counts(nn.Sequential(layer)) == {"0": (1, 3)}


def test_negative_variances_are_counted_once_per_iteration_and_never_without_compensation():
    """A second call in one iteration reuses the window (counts unchanged); Naive CBN and window 1
    never compensate, so never count."""
    layer, x, _ = one_slot_compensated_below_zero("clamp")
    layer(x.clone().requires_grad_()).sum().backward()
    assert (int(layer.negative_variances), int(layer.compensated_entries)) == (1, 3)
    inputs = batches(5, dtype=torch.float64)
    for kwargs in ({"compensate": False}, {"window": 1}):
        net = conv_cbn_net(dtype=torch.float64, **kwargs)
        train(net, inputs, lr=1.0)
        assert all(int(m.negative_variances) == int(m.compensated_entries) == 0 for m in cbn_layers(net))


def test_an_unknown_negative_variance_rule_is_refused():
    with pytest.raises(ValueError, match="negative_variance must be 'clamp'"):
        cbn.CrossIterationBatchNorm2d(4, negative_variance="zero")


def test_naive_and_efficient_paths_give_the_same_statistics():
    inputs = batches(6, dtype=torch.float64)
    efficient = conv_cbn_net(window=4, grad_path="efficient", dtype=torch.float64)
    naive = conv_cbn_net(window=4, grad_path="naive", dtype=torch.float64)
    # The same parameters; each keeps its own (empty) history, whose fields differ by path.
    naive.load_state_dict({k: v for k, v in efficient.state_dict().items() if ".history_" not in k})
    for a, b in zip(train(efficient, inputs, lr=0.2), train(naive, inputs, lr=0.2)):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(cbn_layers(efficient), cbn_layers(naive)):
        assert_close(a.running_mean, b.running_mean, rtol=1e-10, atol=1e-12)
        assert_close(a.running_var, b.running_var, rtol=1e-10, atol=1e-12)
        assert a.window_entries == b.window_entries == 4


def window_truth(conv: nn.Conv2d, window_inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled mean and variance of the window's examples recomputed under the conv's current weights."""
    with torch.no_grad():
        xs = torch.cat([conv(x) for x in window_inputs])
    return xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=False)


def statistic_errors(compensate: bool) -> list[float]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = cbn.CrossIterationBatchNorm2d(8, momentum=1.0, window=4, compensate=compensate).bind(conv)
    head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    params = [*conv.parameters(), *layer.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    inputs = batches(16, shape=(2, 3, 12, 12))
    target = torch.randn(2, 4)
    errors = []
    for t, x in enumerate(inputs):
        true_mean, true_var = window_truth(conv, inputs[max(0, t - 3): t + 1])
        loss = (head(layer(conv(x))) - target).square().mean()
        loss.backward()
        n = layer.window_entries * 2 * 12 * 12
        used_var = layer.running_var * (n - 1) / n
        if t >= 3:
            errors.append(((layer.running_mean - true_mean).abs().sum() + (used_var - true_var).abs().sum()).item())
        opt.step()
        opt.zero_grad()
    return errors


def test_compensation_tracks_current_weights_better_than_naive_averaging():
    """The method's point: compensated statistics are closer to the window recomputed under theta_t."""
    cbn_errors, naive_errors = statistic_errors(True), statistic_errors(False)
    assert sum(naive_errors) > 0.1  # the weights really moved
    assert sum(cbn_errors) < 0.25 * sum(naive_errors), (sum(cbn_errors), sum(naive_errors))


def test_eval_mode_is_batchnorm_with_the_running_statistics():
    net = conv_cbn_net(window=3)
    train(net, batches(5))
    bn_net = bn_net_like(net)
    net.eval()
    bn_net.eval()
    x = batches(1, seed=9)[0]
    assert torch.equal(net(x), bn_net(x))


@pytest.mark.parametrize("grad_path", ["efficient", "naive"])
def test_autocast_bfloat16_on_cpu(grad_path):
    inputs = batches(5)
    net = conv_cbn_net(window=3, grad_path=grad_path)
    ref = copy.deepcopy(net)
    def forward_in_bfloat16(x):  # autocast around the forward only, as torch.amp prescribes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    outs = train(net, inputs, forward=forward_in_bfloat16)
    ref_outs = train(ref, inputs)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    for layer in cbn_layers(net):
        assert layer.history_mean.dtype == torch.float32  # statistics stay float32 under AMP
        assert torch.isfinite(layer.running_var).all()
        assert layer.window_entries == 3
    for out, ref_out in zip(outs, ref_outs):
        assert_close(out.float(), ref_out, rtol=0.05, atol=0.05)


def test_history_memory_efficient_vs_naive_for_a_256_channel_conv():
    """(k-1)*(|W| + C_in*K + 2C) floats efficient (the mean and variance need no stored offsets), and
    an int64 stamp (its iteration) per past step; the dense path keeps 2*C_out*|W| per past step."""
    k, c, kernel = 4, 16, 3
    weight_numel = c * c * kernel * kernel
    for grad_path, per_step in (("efficient", weight_numel + c * kernel * kernel + 2 * c),
                                ("naive", 2 * c * weight_numel + 2 * c)):
        conv = nn.Conv2d(c, c, kernel, padding=1, bias=False)
        layer = cbn.CrossIterationBatchNorm2d(c, window=k, grad_path=grad_path).bind(conv)
        train(nn.Sequential(conv, layer), batches(k + 1, shape=(2, c, 6, 6)))
        cache = (2 * c + 1) * (k - 1) * 4  # this iteration's compensated window, and a weight per slot
        assert layer.history_bytes() == (k - 1) * (per_step * 4 + 8) + cache


@pytest.mark.parametrize("grad_path", ["efficient", "naive"])
def test_statistics_ignore_an_enclosing_autocast(grad_path):
    """Given the same bfloat16 input, the layer computes the same whether or not autocast is on."""
    inside = conv_cbn_net(window=3, grad_path=grad_path)
    outside = copy.deepcopy(inside)

    def layer_inside_autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inside(x)

    def layer_outside_autocast(x):
        conv, layer, *rest = outside
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
        h = layer(h)  # the first CBN runs with autocast off, on the same bfloat16 input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.Sequential(*rest)(h)

    inputs = batches(5)
    train(inside, inputs, forward=layer_inside_autocast)
    train(outside, inputs, forward=layer_outside_autocast)
    first_inside, first_outside = cbn_layers(inside)[0], cbn_layers(outside)[0]
    assert first_inside.window_entries == 3
    assert torch.equal(first_inside.running_mean, first_outside.running_mean)
    assert torch.equal(first_inside.running_var, first_outside.running_var)
