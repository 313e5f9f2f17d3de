"""The layer on every device present: the float64 Algorithm 1 reference in float64 and float32,
bf16 autocast against float32, k=1 against BatchNorm2d, and on CUDA no host synchronization in a
steady-state training step, eager or recorded as CUDA graphs (mode="reduce-overhead"). On a
machine without CUDA the CUDA cases are skipped (tools/gpu-run runs them on a GPU: ``table6`` the
eager ones first, ``rest`` the CUDA-graph one)."""

import pytest
import torch
from helpers import DEVICES, batches, cbn_layers, conv_cbn_net, train
from reference_cbn import ReferenceCBN
from torch import nn
from torch.testing import assert_close

import cbn


def _against_algorithm_1(device: str, dtype: torch.dtype, autocast: torch.dtype | None = None):
    """Each step's output and conv weight gradient, layer and float64 reference, on the device."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double().to(device)
    reference = ReferenceCBN(conv, window=3, burn_in=1, eps=cbn.CrossIterationBatchNorm2d(4).eps)
    conv_under_test = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(device, dtype)
    conv_under_test.load_state_dict(conv.state_dict())
    layer_under_test = cbn.CrossIterationBatchNorm2d(4, affine=False, momentum=1.0, window=3, burn_in=1).to(device, dtype)
    layer_under_test.bind(conv_under_test)
    opt_under_test = torch.optim.SGD(conv_under_test.parameters(), lr=0.2, momentum=0.9)
    pairs = []
    for t, y in enumerate(batches(6, shape=(2, 3, 9, 9), dtype=torch.float64)):
        y = y.to(device)
        ref_out = reference(y, t)[0]
        ref_grad = torch.autograd.grad(ref_out.square().mean() + ref_out.mean(), conv.weight)[0]
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = layer_under_test(conv_under_test(y.to(dtype)))
        (out.double().square().mean() + out.double().mean()).backward()  # the loss as the reference takes it
        pairs.append((out.double(), ref_out, conv_under_test.weight.grad.double(), ref_grad))
        opt_under_test.step()
        opt_under_test.zero_grad()
        with torch.no_grad():  # the reference's conv takes the tested conv's step: both see the same weights
            conv.weight.copy_(conv_under_test.weight)
            conv.bias.copy_(conv_under_test.bias)
    return pairs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-9, 1e-10), (torch.float32, 1e-4, 1e-5)],
                         ids=["float64", "float32"])
def test_the_layer_matches_algorithm_1_on_the_device(device, dtype, rtol, atol):
    for out, ref_out, grad, ref_grad in _against_algorithm_1(device, dtype):
        assert_close(out, ref_out, rtol=rtol, atol=atol)
        assert_close(grad, ref_grad, rtol=rtol * 10, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_stays_near_algorithm_1_on_the_device(device):
    for out, ref_out, grad, ref_grad in _against_algorithm_1(device, torch.float32, autocast=torch.bfloat16):
        assert_close(out, ref_out, rtol=0.05, atol=0.05)  # bf16 keeps 8 bits of mantissa
        assert_close(grad, ref_grad, rtol=0.1, atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_window_one_is_batchnorm_on_the_device(device):
    net = conv_cbn_net(window=1).to(device)
    bn_net = nn.Sequential(*(nn.BatchNorm2d(m.num_features) if isinstance(m, cbn.CrossIterationBatchNorm2d) else m
                             for m in __import__("copy").deepcopy(net))).to(device)
    bn_net.load_state_dict(net.state_dict(), strict=False)
    inputs = [x.to(device) for x in batches(4)]
    for a, b in zip(train(net, inputs), train(bn_net, inputs)):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    for layer, bn in zip(cbn_layers(net), [m for m in bn_net if isinstance(m, nn.BatchNorm2d)]):
        assert_close(layer.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; tools/gpu-run runs this on a GPU")
def test_a_steady_state_cuda_training_step_never_waits_for_the_device():
    net = conv_cbn_net(window=4).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = batches(1)[0].cuda()

    def step():
        (net(x).square().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(6):  # the window full, the allocator warm
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; tools/gpu-run runs this on a GPU")
def test_reduce_overhead_trains_a_cbn_net_as_eager_and_never_waits_for_the_device():
    """torch.compile(mode="reduce-overhead") records the whole training forward as CUDA graphs
    (no graph break to split it), across the end of burn-in and the window filling: outputs,
    parameters and histories as in eager mode (inductor's var_mean against BatchNorm's statistics
    kernel: rounding), and no step of it synchronizes with the host."""
    import copy

    torch._dynamo.reset()
    eager = conv_cbn_net(window=3, burn_in=2).cuda()
    compiled = copy.deepcopy(eager)
    forward = torch.compile(compiled, mode="reduce-overhead", fullgraph=True)
    inputs = [x.cuda() for x in batches(8)]

    def train_on(net, run, check_syncs=False):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        outputs = []
        for step, x in enumerate(inputs):
            torch.compiler.cudagraph_mark_step_begin()
            if check_syncs and step >= 6:  # compiled and recorded by now
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = run(x)
                (out.square().mean() + out.mean()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            outputs.append(out.detach().clone())  # a CUDA graph's output is overwritten by its next replay
        return outputs

    want = train_on(eager, eager)
    got = train_on(compiled, forward, check_syncs=True)
    for a, b in zip(want, got):
        assert_close(b, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(cbn_layers(eager), cbn_layers(compiled)):
        assert a.iteration == b.iteration == 8 and a.slot_iterations == b.slot_iterations
        for name in ("history_mean", "history_var", "history_grad_sq", "running_mean", "running_var"):
            assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-4)
