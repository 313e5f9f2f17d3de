"""What an iteration is: the window advances once per optimizer update, whatever runs in between."""

import copy
import warnings

import pytest
import torch
from helpers import batches, cbn_layers, conv_cbn_net, train
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import cbn


def history(net: nn.Module) -> list[dict]:
    return [
        {"iteration": m.iteration, "slots": list(m.slot_iterations),
         **{k: v.clone() for k, v in m.state_dict().items() if k.startswith("history_")}}
        for m in cbn_layers(net)
    ]


def assert_same_history(a: nn.Module, b: nn.Module) -> None:
    for ha, hb in zip(history(a), history(b)):
        assert ha.keys() == hb.keys()
        for key in ha:
            if isinstance(ha[key], torch.Tensor):
                assert_close(ha[key], hb[key])
            else:
                assert ha[key] == hb[key], key


def test_window_advances_once_per_optimizer_step():
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    train(net, batches(5))
    assert layer.iteration == 5  # five steps taken: the next forward is iteration 5
    assert sorted(layer.slot_iterations) == [3, 4]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recompute_pushes_no_extra_history(use_reentrant):
    plain = conv_cbn_net(window=3)
    checkpointed = copy.deepcopy(plain)
    inputs = [x.requires_grad_() for x in batches(5)]
    outs = train(plain, inputs)
    outs_ckpt = train(checkpointed, inputs, forward=lambda x: checkpoint(checkpointed, x, use_reentrant=use_reentrant))
    for a, b in zip(outs, outs_ckpt):
        assert_close(a, b)
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert_close(a, b)
    assert_same_history(plain, checkpointed)


def test_module_called_twice_in_one_step_records_once_and_sees_one_window():
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    entries_seen = []

    def twice(x):
        first = net(x)
        entries_seen.append(layer.window_entries)
        second = net(x.flip(-1))
        entries_seen.append(layer.window_entries)
        return first + second

    train(net, batches(4), forward=twice)
    assert layer.iteration == 4
    assert sorted(layer.slot_iterations) == [2, 3]
    assert entries_seen == [1, 1, 2, 2, 3, 3, 3, 3]


def test_profiling_passes_between_steps_leave_the_history_alone():
    plain = conv_cbn_net(window=3)
    profiled = copy.deepcopy(plain)

    def profile_then_train(x):
        with torch.no_grad():  # e.g. a FLOP count or a latency probe in train mode
            profiled(x * 3.0)
        with FlopCounterMode(display=False):
            profiled(x - 1.0)  # a grad-enabled pass that is not followed by an update
        return profiled(x)

    train(plain, batches(5), forward=plain)
    train(profiled, batches(5), forward=profile_then_train)
    # The grad-enabled pass ran first in each iteration, so its statistics are the recorded ones:
    # same slots and counters, different values (x - 1 vs x). The window length is what matters here.
    for a, b in zip(history(plain), history(profiled)):
        assert a["iteration"] == b["iteration"] == 5
        assert a["slots"] == b["slots"]


def test_no_grad_training_pass_records_nothing():
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x in batches(3):
        with torch.no_grad():
            net(x)
        net(x).sum().backward()  # keep weights moving so iterations advance
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        net(batches(1, seed=5)[0])  # a new iteration seen only under no_grad
    assert layer.iteration == 3
    assert sorted(layer.slot_iterations) == [1, 2]


def test_a_skipped_optimizer_step_does_not_advance_the_window():
    """As when GradScaler skips a step on inf gradients: the weights did not change, no new iteration."""
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    for x in batches(3):
        net(x).sum().backward()
        net.zero_grad()
    assert layer.iteration == 0
    assert layer.slot_iterations.count(0) == 1


@pytest.mark.parametrize("window, burn_in, expected", [
    (3, 2, [1, 1, 1, 2, 3, 3]),
    (4, 0, [1, 2, 3, 4, 4, 4]),
    (1, 0, [1, 1, 1, 1, 1, 1]),
])
def test_burn_in_then_the_window_fills_one_iteration_at_a_time(window, burn_in, expected):
    net = conv_cbn_net(window=window, burn_in=burn_in)
    layer = cbn_layers(net)[0]
    seen = []

    def forward(x):
        out = net(x)
        seen.append(layer.window_entries)
        return out

    train(net, batches(6), forward=forward)
    assert seen == expected
    if burn_in:  # nothing recorded during burn-in
        assert min(layer.slot_iterations) >= burn_in


def batch_mean(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return conv(x).mean((0, 2, 3))


def test_a_second_call_in_an_iteration_does_not_overwrite_the_first_calls_record():
    """Only the first grad-enabled call of an iteration is recorded: by content, not by counts."""
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    train(net, batches(2))
    first, second = batches(2, seed=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expected = batch_mean(net[0], first)  # the iteration-2 statistics the record must hold
    (net(first).sum() + net(second).sum()).backward()
    slot = layer.slot_iterations.index(2)
    assert_close(layer.history_mean[slot], expected)
    assert not torch.allclose(batch_mean(net[0], second), expected)  # the second call would differ
    opt.step()


def test_a_hole_in_the_history_keeps_the_iteration_k_steps_back_out_of_the_window():
    """After an iteration that recorded nothing, the slot still holding iteration t-k is not used:
    Naive CBN with momentum 1 puts the window mean in running_mean, compared by content."""
    net = conv_cbn_net(window=3, compensate=False)
    layer = cbn_layers(net)[0]
    layer.momentum = 1.0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    inputs = batches(4, seed=3)
    means = []
    for t, x in enumerate(inputs):
        means.append(batch_mean(net[0], x))
        if t == 2:
            with torch.no_grad():  # iteration 2 runs but records nothing: a hole
                net(x)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01)  # a new iteration without a backward pass
            continue
        net(x).sum().backward()
        if t < 3:
            opt.step()
            opt.zero_grad()
    # Iteration 3's window is t-2 .. t-1 = {1, 2}; 2 recorded nothing and 0 (= t-k) must stay out.
    assert layer.window_entries == 2
    assert_close(layer.running_mean, (means[3] + means[1]) / 2)


def test_a_step_gradscaler_skips_on_inf_gradients_does_not_advance_the_window():
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for x in batches(3):
        scaler.scale(net(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert layer.iteration == 3
    net(batches(1, seed=4)[0]).sum().backward()
    net[0].weight.grad[0, 0, 0, 0] = float("inf")  # GradScaler skips this step
    scaler.step(opt)
    assert layer.iteration == 3 and sorted(layer.slot_iterations) == [2, 3]  # 3 recorded in place of 1 ...
    opt.zero_grad()
    net(batches(1, seed=5)[0])  # ... and the next forward is still iteration 3, recording nothing more
    assert layer.iteration == 3


def test_two_optimizers_over_one_layer_advance_it_once_per_step():
    """The conv in one optimizer, the norm in another: both step, one iteration (an update before
    any forward of the next iteration belongs to the iteration that ended)."""
    net = conv_cbn_net(window=3)
    layer = cbn_layers(net)[0]
    convs = torch.optim.SGD([p for n, p in net.named_parameters() if n.startswith(("0.", "3."))], lr=0.1)
    norms = torch.optim.SGD([p for n, p in net.named_parameters() if n.startswith(("1.", "4."))], lr=0.1)
    for x in batches(3):
        net(x).sum().backward()
        convs.step()
        norms.step()
        with torch.no_grad():  # and a change by hand after the steps, as weight clipping makes
            net[0].weight.clamp_(-1, 1)
        convs.zero_grad()
        norms.zero_grad()
    assert layer.iteration == 3 and sorted(layer.slot_iterations) == [1, 2]


def hand_written_sgd(net: nn.Module, inputs, forward, advance: bool) -> list[torch.Tensor]:
    outputs = []
    for x in inputs:
        out = forward(x)
        out.square().mean().backward()
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
        if advance:
            cbn.advance(net)
        outputs.append(out.detach())
    return outputs


def test_compiled_training_without_an_optimizer_advances_by_cbn_advance_and_warns_without_it():
    eager = conv_cbn_net(window=3)
    compiled, forgotten = copy.deepcopy(eager), copy.deepcopy(eager)
    inputs = batches(5)
    want = hand_written_sgd(eager, inputs, eager, advance=False)  # eager follows the version counters
    torch._dynamo.reset()
    got = hand_written_sgd(compiled, inputs, torch.compile(compiled, backend="eager", fullgraph=True), advance=True)
    for a, b in zip(want, got):
        assert_close(a, b)
    assert cbn_layers(compiled)[0].slot_iterations == cbn_layers(eager)[0].slot_iterations == [4, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled.eval()  # advanced: nothing to say

    torch._dynamo.reset()
    hand_written_sgd(forgotten, inputs, torch.compile(forgotten, backend="eager", fullgraph=True), advance=False)
    assert cbn_layers(forgotten)[0].iteration == 0  # never advanced
    with pytest.warns(RuntimeWarning, match=r"iteration never advanced.*cbn.advance\(model\)"):
        forgotten.eval()
