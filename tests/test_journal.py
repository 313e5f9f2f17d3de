"""The run journal: finished cases survive a failing final write or a dead runner, and `recover`
turns a journal into the results file the run would have written."""

import dataclasses
from pathlib import Path

import pytest

from bench import cli, env, journal, results, session
from bench.metrics import count, timing
from bench.results import CaseResult, ResultsFileError


def header() -> dict:
    return {"stem": "20261127T000000Z_smoke_cpu", "profile": "smoke", "device": "cpu", "suites": ["fake"],
            "environment": dataclasses.asdict(env.capture("cpu", []))}


def finished(name: str) -> CaseResult:
    return CaseResult("fake", name, {"label": name}, "ok", metrics={"answer_flops": count(42.0, "flop"),
                                                                 "work_time": timing([0.1, 0.2])})


@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(session, "suite_registry", lambda: {"fake": "fake_suite"})


def test_a_journal_keeps_each_group_and_drops_a_torn_last_line(tmp_path):
    path = journal.start(journal.path_for(tmp_path, "run"), header())
    journal.append(path, [finished("A")])
    journal.append(path, [finished("B"), finished("C")])
    with path.open("a") as f:
        f.write('{"suite": "fake", "case": "D", "par')  # killed mid-write
    head, cases = journal.read(path)
    assert head["profile"] == "smoke" and [c.case for c in cases] == ["A", "B", "C"]
    assert cases[0] == finished("A")


def test_a_journal_from_a_dead_run_becomes_its_results_file(tmp_path, fake_registry, capsys):
    path = journal.start(journal.path_for(tmp_path, "run"), header())
    journal.append(path, [finished("A"), finished("B")])
    assert cli.main(["recover", str(path)]) == 0
    written = tmp_path / "20261127T000000Z_smoke_cpu.json"
    run = results.load(written)
    assert [c.case for c in run.cases] == ["A", "B"] and run.derived[0].value == 2.0  # fake_suite's derive
    assert written.with_suffix(".md").exists() and not path.exists()


def test_a_failing_final_write_points_at_the_journal(tmp_path, fake_registry, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "save_new", full_disk)
    monkeypatch.setattr(session, "_run_with_progress", lambda cases, registry, device, threads, known, on_group, nodes: (
        on_group([finished("A")]) or ([finished("A")], False)))
    plan = session.Plan(["fake"], {"fake": session.load_suite({"fake": "fake_suite"}, "fake")}, "cpu", "smoke", [])
    with pytest.raises(ValueError, match=r"could not write the results .* every finished case is in .*journal.jsonl: "
                                         r"`python -m bench recover"):
        session.execute(plan, None, tmp_path)
    (left,) = tmp_path.glob(".*.journal.jsonl")
    assert [c.case for c in journal.read(left)[1]] == ["A"]


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"schema": "cbn-bench/results"}\n')
    with pytest.raises(ResultsFileError, match="not a cbn-bench/journal v1 journal"):
        journal.read(path)
