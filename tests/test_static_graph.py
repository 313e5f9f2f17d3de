"""CBN's training step is one static graph: no graph break for dynamo, the same graph at every
iteration (one recompile at the end of burn-in), no host synchronization, and a fullgraph-compiled
ResNet-18 trains as the eager one does. The compiled runs use dynamo's capture ("eager") or
aot_eager (AOTAutograd's forward and backward graphs, run by aten): inductor on 2 cores costs minutes
and adds nothing to what is checked here."""

import copy

import pytest
import torch
import torchvision
from helpers import cbn_layers
from torch import nn

import cbn
from bench.compile_census import CompileCensus
from bench.dispatch import count_dispatches


def converted_resnet18(burn_in: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return cbn.convert(torchvision.models.resnet18(num_classes=10), window=4, burn_in=burn_in).train()


def images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)


def train_steps(model: nn.Module, steps: int, forward=None) -> list[torch.Tensor]:
    """SGD steps on seeded batches; returns the losses (detached)."""
    forward = model if forward is None else forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = images(step)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def test_explain_finds_one_graph_and_no_break_in_a_converted_resnet18_training_forward():
    model = converted_resnet18()
    train_steps(model, 5)  # the window is full
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(images(9)[0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_table6_compiled_stacks_have_no_graph_break():
    """What table6 compiles of a detector (backbone + FPN, box head, mask head), with CBN everywhere."""
    from suites.models import FPN_CHANNELS, DetectorSpec, build_detector

    torch.manual_seed(0)
    model = build_detector(DetectorSpec(norm="cbn", norm_options={"window": 4}, placement="all", min_size_px=64,
                                        max_size_px=64)).train()
    heads = model.roi_heads
    stacks = {"backbone": (model.backbone, torch.randn(1, 3, 64, 64)),
              "box head": (heads.box_head, torch.randn(8, FPN_CHANNELS, 7, 7)),
              "mask head": (heads.mask_head, torch.randn(8, FPN_CHANNELS, 14, 14))}
    for name, (stack, x) in stacks.items():
        assert any(isinstance(m, cbn.CrossIterationBatchNorm2d) for m in stack.modules()), name
        torch._dynamo.reset()
        explained = torch._dynamo.explain(stack)(x)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)


@pytest.mark.slow
def test_fullgraph_compiled_resnet18_trains_as_eager_across_burn_in_and_the_window_filling():
    """20 steps, burn-in 3 (window 1), then the window fills over 3 more: losses, parameters,
    histories and iterations equal eager's; the end of burn-in is the one recompile."""
    eager = converted_resnet18(burn_in=3)
    compiled = copy.deepcopy(eager)
    want = train_steps(eager, 20)
    torch._dynamo.reset()
    with CompileCensus() as census:
        got = train_steps(compiled, 20, forward=torch.compile(compiled, backend="aot_eager", fullgraph=True))
    # The same aten ops run (on a CPU the compiled statistics are eager's two reductions): equal up
    # to the order AOTAutograd may give independent ops; bitwise here.
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **tol)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(cbn_layers(eager), cbn_layers(compiled)):
        assert a.iteration == b.iteration == 20 and a.slot_iterations == b.slot_iterations == [18, 19, 17]
        for name in ("history_mean", "history_var", "history_grad_sq", "running_mean", "running_var"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), **tol)
    counted = {name: metric.value for name, metric in census.metrics().items()}
    assert counted["graph_breaks"] == 0 and counted["recompiles"] <= 2, counted


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_steady_state_training_step_never_waits_for_the_device(compiled):
    """No op that hands a value to the host (.item(), nonzero) in forward, backward or optimizer
    step, once the window is full: what would be a device sync on CUDA."""
    model = converted_resnet18()
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = images(0)

    def step():
        nn.functional.cross_entropy(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    torch._dynamo.reset()
    for _ in range(5):
        step()
    assert count_dispatches(step).host_syncs == 0
