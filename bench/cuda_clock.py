"""A clock that reads CUDA events, for pytest-benchmark's ``--benchmark-timer=bench.cuda_clock.now``.

Each reading records an event on the current stream and waits for it, so the time between two
readings is the device's time for the work queued between them, launch gaps included (triton's
``testing.do_bench`` times the same way). pytest-benchmark calibrates how many calls go between
two readings (``--benchmark-min-time``), so launch overhead and the clock's resolution (about a
microsecond) do not dominate a sample. The L2 cache is not flushed between calls: like a training
loop, each call follows the previous one, and the micro-benchmarks' CUDA tensors are larger than L2.
"""

from __future__ import annotations

import torch

_origin: torch.cuda.Event | None = None


def now() -> float:
    """Seconds since the first reading, as the device's event clock measures them."""
    global _origin
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _origin is None:
        _origin = event
        return 0.0
    return _origin.elapsed_time(event) / 1e3
