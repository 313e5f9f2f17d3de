"""CBN under torch.compile: the compiled net trains as eager does (outputs, parameters, window
contents, iteration bookkeeping), and compilation settles: the graphs and graph breaks after a few
steps are all there ever are. Backend "eager" (dynamo's capture only) keeps most tests quick; one
runs inductor."""

import copy

import pytest
import torch
from helpers import batches, cbn_layers, conv_cbn_net, train
from torch._dynamo.utils import counters

HISTORY = ("history_mean", "history_var", "history_grad_sq", "history_iteration", "running_mean", "running_var")


def assert_trained_alike(eager, compiled, want, got, tol):
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(eager.parameters(), compiled.parameters()):  # equal parameters: equal gradients
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(cbn_layers(eager), cbn_layers(compiled)):
        assert a.iteration == b.iteration and a.slot_iterations == b.slot_iterations
        for name in HISTORY:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)
    assert eager.state_dict().keys() == compiled.state_dict().keys()


@pytest.mark.parametrize("backend, mode", [("eager", None), ("inductor", None), ("inductor", "max-autotune-no-cudagraphs")])
def test_a_compiled_cbn_net_trains_as_eager(backend, mode):
    torch._dynamo.reset()
    eager = conv_cbn_net(window=3)
    compiled = copy.deepcopy(eager)
    inputs = batches(6)
    want = train(eager, inputs)
    got = train(compiled, inputs, forward=torch.compile(compiled, backend=backend, mode=mode))
    # Compiled, the batch statistics come from var_mean rather than BatchNorm's kernel: rounding only.
    assert_trained_alike(eager, compiled, want, got, tol=1e-5)
    assert cbn_layers(compiled)[0].iteration == 6


def test_a_second_call_in_an_iteration_records_nothing_when_compiled():
    """Called twice per optimizer step (as a checkpoint's recompute would), the compiled net keeps
    one window entry per step and normalizes the second call with the same window."""
    torch._dynamo.reset()
    eager = conv_cbn_net(window=3)
    compiled = copy.deepcopy(eager)
    inputs = batches(5)
    forward = torch.compile(compiled, backend="eager")

    def twice(net_forward):
        def call(x):
            first = net_forward(x)
            second = net_forward(x * 2)
            return first + second
        return call

    want = train(eager, inputs, forward=twice(eager))
    got = train(compiled, inputs, forward=twice(forward))
    assert_trained_alike(eager, compiled, want, got, tol=1e-5)
    assert cbn_layers(compiled)[0].slot_iterations == [4, 3]


def compile_counts(steps: int) -> tuple[int, int, int]:
    """(graphs, graph breaks, frames dynamo gave up on) after training a fresh compiled net."""
    torch._dynamo.reset()
    counters.clear()
    net = conv_cbn_net(window=4)
    train(net, batches(steps), forward=torch.compile(net, backend="eager"))
    frames = counters["frames"]
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), frames["total"] - frames["ok"]


def test_a_cbn_net_compiles_into_one_graph_whatever_the_window_holds():
    """Per-step state (iteration, slot, parameter versions) stays out of the graph: 2 steps (window
    empty, then one entry) and 20 (window full) compile the same single graph, with no break."""
    assert compile_counts(2) == compile_counts(20) == (1, 0, 0)


def test_the_compile_census_counts_graphs_breaks_frames_and_recompiles():
    from torch import nn

    from bench.compile_census import METRICS, CompileCensus

    def census(net):
        torch._dynamo.reset()
        with CompileCensus() as counted:
            net.compile(backend="eager")
            train(net, batches(6))
        metrics = counted.metrics()
        assert set(metrics) == set(METRICS) and {m.kind for m in metrics.values()} == {"count"}
        return {name: m.value for name, m in metrics.items()}

    bn = census(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3),
                              nn.BatchNorm2d(5)))
    assert bn == {"compiled_graphs": 1, "graph_breaks": 0, "compiled_frames": 1, "recompiles": 0}
    # CBN compiles as BN does: one graph at every iteration, the window filling included ...
    assert census(conv_cbn_net(window=3)) == bn
    # ... and the end of burn-in costs one recompile
    assert census(conv_cbn_net(window=3, burn_in=2)) == {"compiled_graphs": 2, "graph_breaks": 0,
                                                         "compiled_frames": 2, "recompiles": 1}
