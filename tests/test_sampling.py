"""How samples are taken: rotating round order, discarded first calls, the CUDA cache policy, and
the worker's CUDA branch, exercised through fakes at the torch.cuda boundary."""

import pytest
import torch

from bench import protocol, sampling, worker


def test_the_order_rotates_so_no_case_always_runs_first():
    orders = [sampling.rotated(["A", "B", "C"], r) for r in range(4)]
    assert orders == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"], ["A", "B", "C"]]
    assert sampling.rotated([], 3) == []


def test_cuda_discards_the_first_call_of_each_round_and_cpu_does_not():
    assert sampling.for_device("cuda", 2) == sampling.Sampling(2, 1, "rotating", "undecided")
    assert sampling.for_device("cpu", 1) == sampling.Sampling(1, 0, "rotating", "not applicable")


def test_the_cache_is_kept_while_every_worker_fits():
    gib = 2**30
    keep, why = sampling.cache_policy([10 * gib] * 6, 80 * gib)  # 66 GiB with contexts, budget 72
    assert keep and why.startswith("kept between rounds")
    keep, why = sampling.cache_policy([12 * gib] * 6, 80 * gib)  # 78 GiB: over
    assert not keep and "the first call of each round, which refills the cache, is discarded" in why


class Counter:
    def __init__(self):
        self.calls = 0

    def step(self):
        self.calls += 1
        return {"step_time": float(self.calls)}

    def timed_round(self, kept, discarded):
        return sampling.keep_last(self.step, kept, discarded)


def test_a_round_drops_its_discarded_calls_and_keeps_the_rest():
    workload = Counter()
    assert workload.timed_round(kept=2, discarded=1) == {"step_time": [2.0, 3.0]}
    assert workload.calls == 3


class FakeCuda:
    """The torch.cuda calls the worker makes, recorded."""

    def __init__(self, monkeypatch):
        self.log = []
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: self.log.append("reset"))
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 5 << 30)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 << 30, 80 << 30))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.log.append("empty"))


class Workload(Counter):
    def measure(self):
        from bench.metrics import count
        from bench.suite import Measurement

        return Measurement({"flops": count(1.0, "flop")})

    def warmup(self):
        pass


@pytest.mark.parametrize("empty_cache", [False, True])
def test_the_cuda_worker_reports_its_peak_and_empties_its_cache_only_when_told(monkeypatch, empty_cache):
    cuda = FakeCuda(monkeypatch)
    measured = worker._run(Workload(), protocol.Measure(), "cuda")
    assert (measured.cuda_peak_reserved_bytes, measured.cuda_total_bytes) == (5 << 30, 80 << 30)
    assert measured.metrics == {"flops": {"value": 1.0, "kind": "count", "unit": "flop"}}
    assert cuda.log == ["reset", "empty"]  # the next case is measured with the device to itself
    cuda.log.clear()
    reply = worker._run(Workload(), protocol.Round(kept=2, discarded=1, empty_cache=empty_cache), "cuda")
    assert reply == protocol.Timed({"step_time": [2.0, 3.0]})
    assert cuda.log == (["empty"] if empty_cache else [])


def test_the_cpu_worker_never_touches_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("called on CPU"))
    assert worker._run(Workload(), protocol.Measure(), "cpu").cuda_peak_reserved_bytes is None
    worker._run(Workload(), protocol.Round(empty_cache=True), "cpu")
