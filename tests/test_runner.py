"""The runner: one process per case, interleaved timing, and no result lost to a failing case."""

from pathlib import Path

import pytest

from bench.runner import ProgressHook, run_cases
from bench.suite import Case

MODULES = {"fake": "fake_suite"}


def case(name: str, tmp_path: Path, behaviour: str = "", rounds: int = 3, group: str = "g", **extra) -> Case:
    params = {"label": name, "log": str(tmp_path / "rounds.log"), "behaviour": behaviour}
    return Case("fake", name, params, group=group, rounds=rounds, **extra)


@pytest.fixture(autouse=True)
def _importable_fake_suite(monkeypatch):
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests)  # the worker processes import fake_suite


def test_cases_of_a_group_are_timed_interleaved(tmp_path):
    results, interrupted = run_cases([case("A", tmp_path), case("B", tmp_path), case("C", tmp_path)], MODULES, "cpu")
    assert not interrupted
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert (tmp_path / "rounds.log").read_text().split() == ["A", "B", "C"] * 3
    a = results[0]
    assert a.samples["work_s"] and len(a.samples["work_s"]) == 3
    assert a.metrics["answer_flops"] == 42.0 and a.notes == ["measured"]
    assert a.metrics["work_median_s"] == sorted(a.samples["work_s"])[1]
    assert {"work_q1_s", "work_q3_s", "work_ci_low_s", "work_ci_high_s"} <= a.metrics.keys()


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
    assert len(results["ok2"].samples["work_s"]) == 3
    assert results["raises"].status == "error" and "deliberate failure while building" in results["raises"].error
    assert results["oom"].status == "error" and "MemoryError" in results["oom"].error
    assert results["crash"].status == "error" and "exited with code 3" in results["crash"].error
    assert results["skip"].status == "skipped" and results["skip"].notes == ["not applicable here"]
    assert results["check"].status == "error" and results["check"].error == "paths disagree"
    assert results["check"].metrics == {"difference": 1.0}


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
    assert by_name["first"].status == "ok" and len(by_name["first"].samples["work_s"]) == 3
    assert by_name["A"].status == "interrupted" and len(by_name["A"].samples["work_s"]) == 2
    assert by_name["B"].status == "interrupted" and len(by_name["B"].samples["work_s"]) == 1
    assert by_name["A"].metrics["answer_flops"] == 42.0
    assert by_name["later"].status == "interrupted" and not by_name["later"].samples
