"""The one timing primitive: wall time of a call, with the device synchronized around it."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of fn: synchronize, perf_counter, call, synchronize, perf_counter.

    Synchronizing before starts the clock on an idle device; synchronizing after makes queued
    CUDA work count. Whole training steps are long (tens of ms and up), so the host-side clock
    is as precise as CUDA events here and also covers the host work the step does.
    """
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start

