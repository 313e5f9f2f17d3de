import time

import pytest
import torch

from bench import env
from bench.timing import time_call


def test_time_call_measures_the_call():
    assert 0.02 <= time_call(lambda: time.sleep(0.02), torch.device("cpu")) < 1.0
    assert time_call(lambda: None, torch.device("cpu")) < 0.02


def test_environment_says_where_a_result_came_from():
    e = env.capture("cpu", ["table6", "--profile", "cpu"])
    assert e.device_name.startswith("cpu: ") and e.device_count == 1
    assert e.torch_version == torch.__version__ and e.threads == torch.get_num_threads()
    assert e.command.endswith("-m bench table6 --profile cpu")
    assert e.git_commit is None or len(e.git_commit) == 40
    assert set(env.OPTIONAL_TOOLS) == set(e.optional_tools)
    assert e.date_utc.endswith("+00:00")


def test_on_cuda_the_clock_waits_for_the_device_before_and_after(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    time_call(lambda: calls.append("call"), torch.device("cuda"))
    assert calls == ["sync", "call", "sync"]


class FakeEvent:
    """A CUDA event on a fake device clock that advances 2.5 ms per recorded event."""

    clock_ms = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.waited = False

    def record(self):
        FakeEvent.clock_ms += 2.5
        self.at = FakeEvent.clock_ms

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, later):
        assert later.waited  # the reading waits for the device first
        return later.at - self.at


def test_the_cuda_event_clock_reads_device_time_in_seconds(monkeypatch):
    from bench import cuda_clock

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda_clock, "_origin", None)
    assert cuda_clock.now() == 0.0
    assert cuda_clock.now() == pytest.approx(0.0025)
    assert cuda_clock.now() == pytest.approx(0.005)
