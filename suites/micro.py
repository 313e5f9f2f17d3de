"""Layer micro-benchmarks for pytest-benchmark: a 3x3 conv and its norm, in training mode, timed
forward and forward+backward, for BN, GN, CBN (efficient path), CBN (naive dense path) and Naive CBN.

Run by ``python -m bench micro`` (``python3 -m nox -s micro``), which passes the timing options and
stores pytest-benchmark's JSON under results/micro/; the unit tests never run them. In each group
("forward", "forward+backward") BN is the reference: the gate reads every norm's median time over
BN's, measured in the same run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cbn
from suites.constants import CPU_NAIVE_BUDGET_BYTES, CUDA_NAIVE_BUDGET_SHARE, WINDOW
from suites.gradpath import naive_bytes_estimate

SHAPES = {"cpu": (2, 64, 32, 48), "cuda": (2, 256, 200, 304)}  # N, C, H, W: the profile is the device type
NORMS = {  # label -> (cbn.norm_layer name, options)
    "bn": ("bn", {}),
    "gn": ("gn", {}),
    "cbn": ("cbn", {"window": WINDOW}),
    "cbn-naive-path": ("cbn", {"window": WINDOW, "grad_path": "naive"}),
    "naive-cbn": ("naive_cbn", {"window": WINDOW}),
}
REFERENCE = "bn"
OPS = ("forward", "forward+backward")


def conv_norm_block(norm: str, channels: int, device: torch.device) -> nn.Sequential:
    kind, options = NORMS[norm]
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), cbn.norm_layer(kind, **options)(channels))
    if kind in ("cbn", "naive_cbn"):
        cbn.convert(block)  # binds the CBN layer to its conv
    return block.to(device).train()


def _skip_unless_it_fits(norm: str, shape: tuple[int, ...], device: torch.device) -> None:
    if NORMS[norm][1].get("grad_path") != "naive":
        return
    n, c, h, w = shape
    need = naive_bytes_estimate(c, 3, n, h, w)
    budget = CPU_NAIVE_BUDGET_BYTES if device.type == "cpu" else int(CUDA_NAIVE_BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory)
    if need > budget:
        pytest.skip(f"the dense path needs about {need / 2**30:.0f} GiB at {shape}, over the {budget / 2**30:.0f} GiB budget")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("op", OPS)
def test_conv_norm(benchmark, request: pytest.FixtureRequest, micro_device: torch.device, op: str, norm: str) -> None:
    shape = SHAPES[micro_device.type]
    _skip_unless_it_fits(norm, shape, micro_device)
    block = conv_norm_block(norm, shape[1], micro_device)
    params = list(block.parameters())
    x = torch.randn(shape, device=micro_device)
    grad = torch.randn(shape, device=micro_device)
    # With bench.cuda_clock (what `python -m bench micro` passes on CUDA) the clock waits for the
    # device itself, so calls queue back to back as in training.
    event_clock = request.config.getoption("benchmark_timer", None) is not None and \
        "cuda_clock" in str(request.config.getoption("benchmark_timer"))

    def step() -> None:
        # Each call is a new training iteration for CBN, whose window advances when its conv's
        # weight is updated in place: bump the parameters' version counters, values unchanged.
        for p in params:
            torch.autograd.graph.increment_version(p)
            p.grad = None
        out = block(x)
        if op == "forward+backward":
            out.backward(grad)
        if micro_device.type == "cuda" and not event_clock:
            torch.cuda.synchronize(micro_device)  # time the kernels, not their launch

    for _ in range(WINDOW + 1):  # CBN's window is full from here on
        step()
    benchmark.group = op
    benchmark.extra_info.update(norm=norm, reference=norm == REFERENCE, shape_nchw=list(shape))
    benchmark(step)
