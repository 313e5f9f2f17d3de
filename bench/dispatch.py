"""Deterministic counts of what one call dispatches, for guarding eager overhead: every aten
operator torch.profiler records (nested ones included: a matmul and the mm it calls count as two),
and the host synchronizations among them.

A host synchronization is an op that hands a tensor's value to Python or sizes a result by its
data, so the host must wait for the device: aten::_local_scalar_dense (.item(), bool(), float(),
int() of a tensor) and aten::nonzero. The counts repeat exactly for a given torch build and device
type; they are not timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


@dataclass(frozen=True)
class Dispatches:
    aten_ops: int
    host_syncs: int


def count_dispatches(fn: Callable[[], object]) -> Dispatches:
    """What one call of fn dispatches (run it warm: a first call may allocate or initialize)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return Dispatches(len(names), sum(name in SYNC_OPS for name in names))
