"""What table6's and classify's workloads share: a model trained by SGD steps, measured for memory
and structure, warmed up, and timed round by round (train step and inference), in its worker.

A subclass sets ``model``, ``optimizer``, ``device``, ``profile`` (with ``warmup_steps``) and
``images`` (what inference feeds the model), and defines ``loss()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench import memory
from bench.metrics import Metric, count, peak
from bench.timing import synchronize, time_call
from suites.constants import WINDOW


class TrainingWorkload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    images: object
    steps_done: int = 0
    inference_warmup_calls = 1

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, train_step's and memory counting's (e.g. a scheduler)."""

    def train_step(self) -> None:
        self.steps_done += 1
        self.loss().backward()
        self.optimizer.step()
        self.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)

    def inference(self) -> None:
        self.model.eval()
        with torch.no_grad():
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
        counted = memory.counted_training_memory(self.model, self.optimizer, self.loss)
        self.after_optimizer_step()  # counting ran one optimizer step
        return {**{name: count(value, "byte") for name, value in counted.items()},
                "peak_rss_bytes": peak(memory.peak_rss_bytes())}

    def warmup(self) -> None:
        for _ in range(max(self.profile.warmup_steps, WINDOW + 1 - self.steps_done)):  # and CBN's window full
            self.train_step()
        for _ in range(self.inference_warmup_calls):
            self.inference()
        synchronize(self.device)

    def profiled_steps(self) -> dict[str, Callable[[], None]]:
        return {"train": self.train_step, "inference": self.inference}

    def timed_round(self) -> dict[str, float]:
        train_step_time = time_call(self.train_step, self.device)
        # Leave training outside the timed call: CBN reads its device-side count of non-finite
        # batches there (one host sync per layer), which no inference pays in a real loop.
        self.model.eval()
        return {"train_step_time": train_step_time, "inference_time": time_call(self.inference, self.device)}


class NoInputForward(nn.Module):
    """A forward as fvcore traces it: no inputs, fn's result out, with the model a submodule so
    that the trace sees its parameters as parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[], object]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self):
        return self._fn()
