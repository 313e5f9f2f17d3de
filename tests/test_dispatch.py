"""Dispatch counts: what they count, and what they guard in CBN's training step."""

import pytest
import torch

from bench.dispatch import count_dispatches
from suites.micro import NORMS, LayerStep

SHAPE = (2, 16, 8, 8)


def steady_step(norm: str) -> LayerStep:
    step = LayerStep(norm, SHAPE, torch.device("cpu"))
    step.fill_window()
    return step


def test_a_value_handed_to_python_is_a_host_sync():
    x = torch.ones(4)
    assert count_dispatches(lambda: x.sum()).host_syncs == 0
    assert count_dispatches(lambda: bool(x.sum() > 0)).host_syncs == 1
    assert count_dispatches(lambda: x.nonzero()).host_syncs == 1


def test_counts_repeat_exactly():
    step = steady_step("cbn")
    assert count_dispatches(step) == count_dispatches(step)


@pytest.mark.parametrize("norm", [n for n in NORMS if n.startswith(("cbn", "naive"))])
def test_a_steady_cbn_training_step_never_waits_for_the_device(norm):
    assert count_dispatches(steady_step(norm)).host_syncs == 0


def test_the_cbn_step_dispatches_the_same_ops_whatever_the_window():
    """All past slots are compensated at once: no op per slot."""
    counts = {norm: count_dispatches(steady_step(norm)).aten_ops for norm in ("cbn-k2", "cbn", "cbn-k8")}
    assert len(set(counts.values())) == 1, counts
