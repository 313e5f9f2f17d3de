"""Results files: round trip, atomic and never-overwriting writes, upgrades and clear refusals."""

import json
from pathlib import Path

import pytest

from bench import results
from bench.gate import sources
from bench.metrics import count, timing
from bench.results import CaseResult, Derived, Environment, FigureId, ResultsFileError, RunResult
from bench.suite import Processes
from bench.training_modes import Mode


def environment() -> Environment:
    return Environment("cpu: test", 1, None, None, None, "2.15.0", "0.29.2", False, False, True, 2, "test cpu",
                       "3.11.7", "Linux", "abc", False, "2026-11-24T00:00:00+00:00", "python -m bench", {"fvcore": "0.1.5"})


def run_result() -> RunResult:
    metrics = {"train_step_time": timing([1.2, 1.25, 1.3]), "train_step_flops": count(1e12, "flop")}
    cases = [CaseResult("table6", "bn", {"norm": "bn"}, "ok", None, metrics, ["a note"], {"kept_per_round": 1},
                        mode=Mode("bf16")),
             CaseResult("table6", "gn", {"norm": "gn"}, "error", "RuntimeError: out of memory",
                        processes=Processes(2, "gloo", 1))]
    derived = [Derived(FigureId("table6", "gn", "train_iter_per_s", "ratio_to:bn"), "gn/bn train iter/s ratio", 0.9, 0.8,
                       1.0, kind="timing"),
               Derived(FigureId("table6", "gn", "train_step_flops", "ratio_to:bn"), "gn/bn train_step_flops ratio", 1.0)]
    return RunResult("cpu", "cpu", ["table6"], environment(), cases, derived)


def test_round_trip_keeps_every_value_unrounded(tmp_path):
    run = run_result()
    path = results.save_new(run, tmp_path, "run")
    assert results.load(path) == run
    assert json.loads(path.read_text())["schema_version"] == results.SCHEMA_VERSION


def test_save_new_never_overwrites_and_leaves_no_temp_files(tmp_path):
    first = results.save_new(run_result(), tmp_path, "run")
    second = results.save_new(run_result(), tmp_path, "run")
    assert (first.name, second.name) == ("run.json", "run-2.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-2.json", "run.json"]


def test_a_file_from_before_typed_settings_is_refused_naming_the_migration_tool(tmp_path):
    data = json.loads(results.to_json(run_result()))
    path = tmp_path / "v6.json"
    path.write_text(json.dumps(dict(data, schema_version=6)))
    with pytest.raises(ResultsFileError, match=r"schema version 6, from before .* tools/migrate_results.py"):
        results.load(path)


def test_a_figure_is_known_by_its_id_not_its_label():
    figure = FigureId("classify", "resnet18/cbn", "train_iter_per_s", "ratio_to:bn")
    assert figure.key == "resnet18/cbn/train_iter_per_s/ratio_to:bn"
    assert str(figure) == "classify.resnet18/cbn/train_iter_per_s/ratio_to:bn"  # the gate's metric name
    run = run_result()
    assert set(run.derived_of("table6")) == {d.id for d in run.derived}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON results file"),
    (json.dumps({"benchmarks": []}), "not a cbn-bench results file"),
    (json.dumps({"schema": "cbn-bench/results", "schema_version": 99}), "schema version 99 is newer"),
    (json.dumps({"schema": "cbn-bench/results", "schema_version": 7, "profile": "cpu"}), "malformed results file"),
    (json.dumps({**json.loads(results.to_json(run_result())), "derived": [{"id": "gn/bn", "label": "x", "value": 1}]}),
     "malformed results file .*expected an object for FigureId"),
])
def test_foreign_or_malformed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ResultsFileError, match=message):
        results.load(path)


def test_every_committed_results_file_loads():
    root = Path(__file__).resolve().parents[1] / "results"
    files = [p for p in root.rglob("*.json") if p.parent.name not in ("counts", "profiles")]  # their own schemas
    assert len(files) >= 10
    for path in files:
        run = sources.load_source(path)  # results files and pytest-benchmark files alike
        assert run.metrics, path


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ResultsFileError, match="no such results file"):
        results.load(tmp_path / "absent.json")
