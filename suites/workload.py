"""What table6's and classify's workloads share: a model trained by SGD steps, measured for memory
and structure, warmed up, and timed round by round, in its worker. A round is a block of
consecutive training steps, then a block of consecutive inference calls on the weights those steps
left (frozen for the block, as in evaluation), each block with the same discarded and kept calls.

A subclass sets ``model``, ``optimizer``, ``device``, ``profile`` (with ``warmup_steps``),
``images`` (what inference feeds the model) and ``mode`` (bench/training_modes.py), defines ``loss()`` (its
forward through ``trained()``), and calls ``enter_mode()`` once the model and images exist and
``distribute()`` before building the optimizer. On several processes (bench/ranks.py) training
steps run through DistributedDataParallel, each rank on its own data; inference runs each rank's
model alone, with no communication, as evaluation does. In a compiled mode the model (or what
``compile_targets`` names) is compiled when warm-up starts: FLOPs and memory are measured eagerly,
in the mode's precision and memory format, and only the timed steps run compiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bench import flops, memory, ranks
from bench.compile_census import CompileCensus
from bench.metrics import Collected, Metric, count, peak
from bench.sampling import keep_last
from bench.suite import Processes
from bench.timing import synchronize, time_call
from bench.training_modes import Mode, optimizer_step
from suites.constants import WINDOW

# Operators the profiler reports as detection ops (bench/profiling.py's op_groups): the RoI heads'
# pooling, the RPN's NMS, and the losses.
DETECTION_OPS = ("roi_align", "nms", "loss", "cross_entropy", "smooth_l1", "binary_cross_entropy")


class TrainingWorkload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    images: object
    mode: Mode = Mode()
    scaler: torch.amp.GradScaler | None = None
    ddp: nn.Module | None = None  # DistributedDataParallel around the model on several processes
    compiled: bool = False
    census: CompileCensus | None = None  # what compiling made of the warm-up (compiled modes)
    steps_done: int = 0
    inference_warmup_calls = 1

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def distribute(self) -> None:
        """On several processes: DDP around the model (CBN keeps its statistics per rank; cbn.convert
        took the history out of DDP's buffer broadcast)."""
        if ranks.world_size() > 1:
            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def trained(self) -> nn.Module:
        """What a training forward calls: DDP around the model on several processes, else the model."""
        return self.ddp or self.model

    @contextlib.contextmanager
    def locally(self) -> Iterator[None]:
        """Training forwards on the model itself, without DDP: for fvcore's jit trace, which must not
        record DDP's buffer broadcast (a collective) as part of the model."""
        ddp, self.ddp = self.ddp, None
        try:
            yield
        finally:
            self.ddp = ddp

    def compile_targets(self) -> list[nn.Module]:
        """The modules a compiled mode compiles in place (nn.Module.compile): the whole model by default."""
        return [self.model]

    def enter_mode(self) -> None:
        self.mode.memory_format(self.model)
        if isinstance(self.images, torch.Tensor):  # detection's image lists go through torchvision's transform
            self.images = self.mode.memory_format(self.images)
        self.scaler = self.mode.grad_scaler(self.device)

    def compile_now(self) -> None:
        if self.mode.compile and not self.compiled:
            if self.ddp is not None:
                # Dynamo's DDPOptimizer (graphs split at DDP's bucket boundaries) fails to compile
                # CBN's autograd.Function in a ResNet-18 (AssertionError: output spec mismatch,
                # torch 2.15); without it DDP reduces the gradients as in eager mode.
                torch._dynamo.config.optimize_ddp = False
            for module in self.compile_targets():
                self.mode.compile_in_place(module)
            self.compiled = True

    def mode_loss(self) -> torch.Tensor:
        """loss() under the mode's autocast (the backward runs outside it, as torch.amp prescribes)."""
        with self.mode.autocast(self.device):
            return self.loss()

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, train_step's and memory counting's (e.g. a scheduler)."""

    def train_step(self) -> None:
        self.steps_done += 1
        optimizer_step(self.mode_loss(), self.optimizer, self.scaler)
        self.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)

    def inference(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.mode.autocast(self.device):
            self.model(self.images)

    def structure(self) -> dict[str, Metric]:
        return {"parameters": count(sum(q.numel() for q in self.model.parameters()), "1"),
                "cbn_layers": count(sum(1 for m in self.model.modules() if hasattr(m, "history_bytes")), "1")}

    def memory(self, notes: list[str]) -> dict[str, Metric]:
        """The allocator peak of one step on CUDA (NVML notes added); the counted bytes on CPU."""
        if self.device.type == "cuda":
            peaks, nvml_notes = memory.cuda_peak_memory(self.train_step, self.device)
            notes += nvml_notes
            return {name: peak(value) for name, value in peaks.items()}
        counted = memory.counted_training_memory(self.model, self.optimizer, self.mode_loss)
        self.after_optimizer_step()  # counting ran one optimizer step
        return {**{name: count(value, "byte") for name, value in counted.items()},
                "peak_rss_bytes": peak(memory.peak_rss_bytes())}

    def count_training(self, found: Collected, notes: list[str]) -> None:
        """A training step's FLOPs and a training forward's multiply-adds, each on its own."""
        found.attempt(("train_step_flops",), lambda: {"train_step_flops": count(flops.counted_flops(self.train_step), "flop")})
        found.attempt(("forward_macs",), lambda: {"forward_macs": count(self.training_forward_macs(notes), "mac")})

    def count_inference(self, found: Collected, forward: Callable[[], object]) -> None:
        """fvcore's multiply-adds of an inference forward (the model in eval mode), on its own."""
        self.model.eval()
        found.attempt(("inference_forward_macs",), lambda: {"inference_forward_macs": count(
            flops.fvcore_forward_flops(NoInputForward(self.model, forward), ())[0], "mac")})

    def training_forward_macs(self, notes: list[str]) -> float:
        """fvcore's multiply-adds of one training forward (the model alone, without DDP); what it
        could not count is added to notes."""
        try:
            with self.locally():
                macs, skipped = flops.fvcore_forward_flops(NoInputForward(self.model, self.loss), ())
        finally:
            self.train_step()  # ends the traced iteration with an optimizer step, traced or not
        if skipped:
            notes.append("fvcore skipped (no FLOPs counted): " + ", ".join(sorted(skipped)))
        return macs

    def warmup(self) -> None:
        with CompileCensus() if self.mode.compile else contextlib.nullcontext() as census:
            self.compile_now()
            for _ in range(max(self.profile.warmup_steps, WINDOW + 1 - self.steps_done)):  # and CBN's window full
                self.train_step()
            for _ in range(self.inference_warmup_calls):
                self.inference()
            # Then the timed rounds' cycle once more (training after evaluation): compiled, the
            # switch back to training mode guards graphs of its own, which must not compile while timed.
            self.train_step()
            self.inference()
            synchronize(self.device)
        self.census = census

    def compile_census(self) -> dict[str, Metric]:
        """What torch.compile made of the warm-up (bench.suite.Compiles); nothing when eager."""
        return self.census.metrics() if self.census is not None else {}

    def profiled_steps(self) -> dict[str, Callable[[], None]]:
        return {"train": self.train_step, "inference": self.inference}

    def op_groups(self) -> dict[str, tuple[str, ...]]:
        return {"detection ops (RoIAlign, NMS, losses)": DETECTION_OPS}

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        train = keep_last(lambda: {"train_step_time": time_call(self.train_step, self.device)}, kept, discarded)
        # Leave training outside the timed calls: CBN reads its device-side count of non-finite
        # batches there (one host sync per layer), which no inference pays in a real loop.
        self.model.eval()
        inference = keep_last(lambda: {"inference_time": time_call(self.inference, self.device)}, kept, discarded)
        return {**train, **inference}


class NoInputForward(nn.Module):
    """A forward as fvcore traces it: no inputs, fn's result out, with the model a submodule so
    that the trace sees its parameters as parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[], object]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self):
        return self._fn()


def mode_caption(mode: Mode, compiled_part: str) -> list[str]:
    """Caption lines saying what a table's training mode means for its figures."""
    lines = []
    if mode.precision != "fp32":
        lines.append(f"{mode.precision}: torch.autocast around each forward"
                     + (", a GradScaler on the loss" if mode.precision == "fp16" else "")
                     + "; train-step FLOPs counted under that autocast, fwd MACs traced in fp32 (a count does not depend "
                       "on precision); CBN's statistics and history stay float32")
    if mode.channels_last:
        lines.append("channels_last: the model's weights (and image batches) in channels_last memory format")
    if mode.compile:
        how = f"inductor, mode {mode.compile_mode}" + (", fullgraph" if mode.fullgraph else "")
        lines.append(f"compiled (torch.compile, {how}): {compiled_part}; FLOPs and memory measured "
                     "before compiling; on several processes without dynamo's DDPOptimizer (optimize_ddp=False)")
    return lines


def processes_caption(processes: Processes) -> list[str]:
    """Caption lines saying how figures of a case on several processes were taken and reduced."""
    if processes.world_size == 1:
        return []
    return [f"{processes.world_size} processes per case (torchrun, {processes.backend}), each with its own images, trained with "
            "DistributedDataParallel; CBN's history per process; memory: the largest process's; FLOPs: per process "
            "(the processes' mean); train iter/s: from the slowest process's time of each step (each one's median in the "
            "JSON); inference: each process's model alone, no communication"]
