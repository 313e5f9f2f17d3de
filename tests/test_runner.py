"""The runner: one process per case, interleaved timing, and no result lost to a failing case."""

import dataclasses
from pathlib import Path

import fake_suite
import pytest

from bench import protocol
from bench.metrics import count
from bench.runner import ProgressHook, _GroupRun, run_cases
from bench.suite import Case

MODULES = {"fake": "fake_suite"}


def case(name: str, tmp_path: Path, behaviour: str = "", rounds: int = 3, group: str = "g", work: str = "same",
         **extra) -> Case:
    settings = fake_suite.Settings(name, str(tmp_path / "rounds.log"), behaviour, work)
    return Case("fake", name, settings, group=group, rounds=rounds, **extra)


@pytest.fixture(autouse=True)
def _importable_fake_suite(monkeypatch):
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests)  # the worker processes import fake_suite


def test_cases_of_a_group_are_timed_interleaved(tmp_path):
    cases = [case("A", tmp_path), case("B", tmp_path), case("C", tmp_path, behaviour="census")]
    results, interrupted = run_cases(cases, MODULES, "cpu")
    assert not interrupted
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    # interleaved, and the order rotates: no case always runs first in a round
    assert (tmp_path / "rounds.log").read_text().split() == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    a = results[0]
    work = a.metrics["work_time"]
    assert (work.kind, work.unit, len(work.samples)) == ("timing", "s", 3)
    assert work.value == work.summary["median"] == sorted(work.samples)[1]
    assert {"n", "q1", "q3", "ci_low", "ci_high"} <= work.summary.keys()
    assert a.metrics["answer_flops"] == count(42.0, "flop") and a.notes == ["measured"]
    assert a.sampling == {"kept_per_round": 1, "discarded_per_round": 0, "order": "rotating", "cuda_cache": "not applicable"}
    # a compiling workload's census after its warm-up joins its metrics (bench.suite.Compiles)
    assert results[2].metrics["compiled_graphs"] == count(2.0, "1") and "compiled_graphs" not in a.metrics


def test_each_group_reaches_the_journal_hook_as_soon_as_it_is_done(tmp_path):
    groups = []
    cases = [case("A", tmp_path, group="g1"), case("B", tmp_path, group="g2"), case("C", tmp_path, group="g2")]
    run_cases(cases, MODULES, "cpu", on_group=lambda done: groups.append([r.case for r in done]))
    assert groups == [["A"], ["B", "C"]]


def test_failures_are_recorded_per_case_and_the_others_finish(tmp_path):
    cases = [
        case("ok1", tmp_path),
        case("raises", tmp_path, "raise_on_build"),
        case("oom", tmp_path, "oom", memory_limit_bytes=2 << 30),
        case("crash", tmp_path, "crash"),
        case("skip", tmp_path, "skip"),
        case("check", tmp_path, "check_fails"),
        case("ok2", tmp_path),
    ]
    results = {r.case: r for r in run_cases(cases, MODULES, "cpu")[0]}
    assert results["ok1"].status == results["ok2"].status == "ok"
    assert len(results["ok2"].metrics["work_time"].samples) == 3
    assert results["raises"].status == "error" and "deliberate failure while building" in results["raises"].error
    assert results["oom"].status == "error" and "MemoryError" in results["oom"].error
    assert results["crash"].status == "error" and "exited with code 3" in results["crash"].error
    assert results["skip"].status == "skipped" and results["skip"].notes == ["not applicable here"]
    assert results["check"].status == "error" and results["check"].error == "paths disagree"
    assert results["check"].metrics == {"difference": count(1.0, "1")}


def test_a_hung_case_times_out_alone(tmp_path):
    cases = [case("hang", tmp_path, "hang", rounds=1, timeout_s=3), case("fine", tmp_path, rounds=1)]
    results = {r.case: r for r in run_cases(cases, MODULES, "cpu")[0]}
    assert results["hang"].status == "error" and "timed out after 3 s" in results["hang"].error
    assert results["fine"].status == "ok"


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    def interrupt_at(text: str) -> None:
        if text == "fake/B: timing round 2/3":
            raise KeyboardInterrupt

    cases = [case("first", tmp_path, group="g1"), case("A", tmp_path, group="g2"), case("B", tmp_path, group="g2"),
             case("later", tmp_path, group="g3")]
    results, interrupted = run_cases(cases, MODULES, "cpu", hook=ProgressHook(describe=interrupt_at))
    by_name = {r.case: r for r in results}
    assert interrupted
    assert by_name["first"].status == "ok" and len(by_name["first"].metrics["work_time"].samples) == 3
    # round 2 runs B before A (the order rotates): the interrupt comes before either's second sample
    assert by_name["A"].status == "interrupted" and len(by_name["A"].metrics["work_time"].samples) == 1
    assert by_name["B"].status == "interrupted" and len(by_name["B"].metrics["work_time"].samples) == 1
    assert by_name["A"].metrics["answer_flops"].value == 42.0
    assert by_name["later"].status == "interrupted" and not by_name["later"].metrics


def test_on_cuda_the_group_keeps_warm_caches_only_when_its_workers_fit(tmp_path):
    group = [case("A", tmp_path), case("B", tmp_path)]
    run = _GroupRun(group, MODULES, "cuda", None, ProgressHook(), {}, {})
    run.workers = {"A": None, "B": None}
    gib = 2**30
    run.measured = {name: protocol.Measured({}, cuda_peak_reserved_bytes=30 * gib, cuda_total_bytes=80 * gib)
                    for name in ("A", "B")}
    run._decide_cache_policy()
    assert run.empty_cache is False
    assert run.sampling["A"].cuda_cache.startswith("kept between rounds (62.0 GiB for 2 workers fit in 72.0 GiB)")
    assert (run.sampling["A"].discarded_per_round, run.sampling["A"].kept_per_round) == (1, 1)
    run.measured["B"] = dataclasses.replace(run.measured["B"], cuda_peak_reserved_bytes=45 * gib)
    run._decide_cache_policy()
    assert run.empty_cache is True and run.sampling["B"].cuda_cache.startswith("emptied after each round (77.0 GiB")


def test_a_failing_metric_is_recorded_missing_and_the_case_keeps_its_other_figures_and_timings(tmp_path):
    (result,) = run_cases([case("A", tmp_path, "metric_fails")], MODULES, "cpu")[0]
    assert result.status == "ok"
    assert result.missing == {"traced_macs": "ZeroDivisionError: division by zero"}
    assert result.metrics["answer_flops"] == count(42.0, "flop")
    assert len(result.metrics["work_time"].samples) == 3


def test_each_sample_remembers_its_round(tmp_path):
    (result,) = run_cases([case("A", tmp_path, rounds=3, kept_per_round=2)], MODULES, "cpu")[0]
    assert result.metrics["work_time"].rounds == (0, 0, 1, 1, 2, 2)


def test_cases_of_a_group_that_did_other_work_are_errors_naming_what_differed(tmp_path):
    cases = [case("A", tmp_path), case("B", tmp_path), case("C", tmp_path, work="other"),
             case("D", tmp_path, group="elsewhere", work="other")]  # another group compares within itself
    results = {r.case: r for r in run_cases(cases, MODULES, "cpu")[0]}
    assert results["A"].status == results["B"].status == results["D"].status == "ok"
    assert results["C"].status == "error"
    assert results["C"].error == "did other work than A, so it cannot be compared: inputs: other here, same in A"
    assert results["C"].metrics["work_time"].samples  # what it measured stays on record
