"""Layer micro-benchmarks for pytest-benchmark: a 3x3 conv and its norm, in training mode, timed
forward and forward+backward, for BN, GN, CBN (efficient path, k = 2, 4 and 8), CBN (naive dense
path), Naive CBN, and CBN's ideal: BN plus CBN's extra weight-gradient convolution ("bn+wgrad").
Each forward+backward benchmark also stores the aten operators and host synchronizations one
steady-state step dispatches (bench/dispatch.py): deterministic counts the gate holds at or below
the baseline, so that a per-slot loop or a host sync coming back fails CI.

Run by ``python -m bench micro`` (``python3 -m nox -s micro``), which passes the timing options and
stores pytest-benchmark's JSON under results/runs/; the unit tests never run them. In each group
("forward", "forward+backward") BN is the reference: the gate reads every norm's minimum time over
BN's, measured in the same run.

``--micro-precision``, ``--micro-channels-last`` and ``--micro-compile`` (what ``python -m bench micro
--precision bf16 --channels-last --compile`` passes) run the step in a training mode (bench/training_modes.py):
autocast around the forward, the block and its tensors channels_last, the block compiled in place
(``nn.Module.compile``). Dispatch counts are taken in eager modes only: a compiled step's aten
calls are inductor's kernels, not the layer's dispatches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import cbn
from bench.dispatch import count_dispatches
from bench.suite import Case
from bench.training_modes import OPTIONS as MODE_OPTIONS
from bench.training_modes import Mode
from cbn.ops import weight_grad
from suites.constants import CPU_NAIVE_BUDGET_BYTES, CUDA_NAIVE_BUDGET_SHARE, WINDOW
from suites.gradpath import naive_bytes_estimate

SHAPES = {"cpu": (2, 64, 32, 48), "cuda": (2, 256, 200, 304)}  # N, C, H, W: the profile is the device type
NORMS = {  # label -> (cbn.norm_layer name, options)
    "bn": ("bn", {}),
    "gn": ("gn", {}),
    "cbn": ("cbn", {"window": WINDOW}),
    "cbn-k2": ("cbn", {"window": 2}),  # k = 2 and 8 beside k = 4: CBN's step must not grow with k
    "cbn-k8": ("cbn", {"window": 8}),
    "cbn-naive-path": ("cbn", {"window": WINDOW, "grad_path": "naive"}),
    "naive-cbn": ("naive_cbn", {"window": WINDOW}),
    "bn-control": ("bn", {}),  # BN again, the A/A control: its ratio to BN is what the ordering and noise give
    # CBN's ideal: BN plus the one operation CBN adds, its conv weight gradient (WithWeightGradient)
    "bn+wgrad": ("bn", {}),
}
WITH_WEIGHT_GRADIENT = ("bn+wgrad",)
REFERENCE = "bn"
LONGEST_WINDOW = max(options.get("window", 1) for _, options in NORMS.values())
OPS = ("forward", "forward+backward")
OPTIONS = dict(MODE_OPTIONS)  # the step runs in any training mode (`python -m bench profile`)
SUBJECT = "conv 3x3 + norm, training mode"  # what a benchmark times, as its table's caption says


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
    if device.type == "cpu":
        budget = CPU_NAIVE_BUDGET_BYTES
    else:
        budget = int(CUDA_NAIVE_BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory)
    if need > budget:
        pytest.skip(f"the dense path needs about {need / 2**30:.0f} GiB at {shape}, over the {budget / 2**30:.0f} GiB budget")


class WithWeightGradient(nn.Module):
    """A conv + BN block that also computes what CBN's step adds to BN's: the conv's weight gradient
    for grad_output = its output (the efficient path's d nu / d theta, as cbn.ops computes it), under
    no_grad and returned, so that a compiler keeps it. Its time is the floor for CBN's step."""

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv, norm = self.block
        y = conv(x)
        with torch.no_grad():
            grad = weight_grad(x, y, conv.weight, list(conv.stride), list(conv.padding), list(conv.dilation),
                               conv.groups)
        return norm(y), grad


class LayerStep:
    """One training iteration of a conv + norm block: forward, and backward for "forward+backward"."""

    def __init__(self, norm: str, shape: tuple[int, ...], device: torch.device, op: str = "forward+backward",
                 mode: Mode = Mode()) -> None:
        block = conv_norm_block(norm, shape[1], device)
        self.block = mode.memory_format(WithWeightGradient(block) if norm in WITH_WEIGHT_GRADIENT else block)
        self.params = list(self.block.parameters())
        self.x = mode.memory_format(torch.randn(shape, device=device))
        self.grad = mode.memory_format(torch.randn(shape, device=device))
        self.op = op
        self.mode = mode
        if mode.compile:
            mode.compile_in_place(self.block)

    def __call__(self) -> None:
        # Each call is a new training iteration for CBN: the parameters stand still (no optimizer),
        # so the step advances CBN's clock itself, as a training loop without one would.
        cbn.advance(self.block)
        for p in self.params:
            p.grad = None
        with self.mode.autocast(self.x.device):
            out = self.block(self.x)
        if isinstance(out, tuple):  # WithWeightGradient: the block's output and the weight gradient
            out = out[0]
        if self.op == "forward+backward":
            out.backward(self.grad)

    def fill_window(self) -> None:
        for _ in range(LONGEST_WINDOW + 1):  # every CBN's window is full from here on
            self()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("op", OPS)
def test_conv_norm(benchmark, request: pytest.FixtureRequest, micro_device: torch.device, micro_mode: Mode, op: str,
                   norm: str) -> None:
    shape = SHAPES[micro_device.type]
    _skip_unless_it_fits(norm, shape, micro_device)
    layer_step = LayerStep(norm, shape, micro_device, op, micro_mode)
    # With bench.cuda_clock (what `python -m bench micro` passes on CUDA) the clock waits for the
    # device itself, so calls queue back to back as in training.
    event_clock = "cuda_clock" in str(request.config.getoption("benchmark_timer", ""))

    def step() -> None:
        layer_step()
        if micro_device.type == "cuda" and not event_clock:
            torch.cuda.synchronize(micro_device)  # time the kernels, not their launch

    layer_step.fill_window()
    benchmark.group = op
    benchmark.extra_info.update(norm=norm, reference=norm == REFERENCE, shape_nchw=list(shape), subject=SUBJECT)
    if op == "forward+backward" and not micro_mode.compile:  # one steady-state training step, counted before it is timed
        benchmark.extra_info.update(dataclasses.asdict(count_dispatches(layer_step)))
    benchmark(step)


# ---------------------------------------------------------------------- for `python -m bench profile --suite micro`
class LayerWorkload:
    """The micro-benchmark's forward+backward step as a worker's workload (bench/profiling.py)."""

    def __init__(self, norm: str, device: str, mode: Mode = Mode()) -> None:
        self.step = LayerStep(norm, SHAPES[torch.device(device).type], torch.device(device), mode=mode)

    def warmup(self) -> None:
        self.step.fill_window()

    def profiled_steps(self) -> dict[str, LayerStep]:
        return {"train": self.step}

    def op_groups(self) -> dict[str, tuple[str, ...]]:
        return {}  # a conv and a norm: the profiler's own groups cover it


def profiled_cases(norms: list[str], profile: str | None, device: str,
                   options: dict[str, str]) -> tuple[list[Case], str]:
    """One case per norm for `python -m bench profile --suite micro`: the layer step has no
    profiles; its shape is the device type's (SHAPES), which names the report."""
    if profile is not None:
        raise ValueError("--profile: the micro-benchmarks have none (their shape is the device type's)")
    return cases(norms, Mode.from_options(options).check(torch.device(device).type)), torch.device(device).type


def cases(norms: list[str], mode: Mode = Mode()) -> list[Case]:
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"the micro-benchmarks have no norm {unknown[0]!r}; they have {', '.join(NORMS)}")
    return [Case("micro", norm, Settings(norm), mode) for norm in norms]


@dataclass(frozen=True)
class Settings:
    """A profiled layer step: its norm (a key of NORMS); the shape is the device type's (SHAPES)."""

    norm: str


SETTINGS = Settings


def build(case: Case, device: str) -> LayerWorkload:
    return LayerWorkload(case.settings.norm, device, case.mode or Mode())
