"""Results files: round trip, atomic and never-overwriting writes, upgrades and clear refusals."""

import json
from pathlib import Path

import pytest

from bench import results
from bench.gate import sources
from bench.metrics import count, timing
from bench.results import CaseResult, Derived, Environment, ResultsFileError, RunResult


def environment() -> Environment:
    return Environment("cpu: test", 1, None, None, None, "2.15.0", "0.29.2", False, False, True, 2, "test cpu",
                       "3.11.7", "Linux", "abc", False, "2026-11-24T00:00:00+00:00", "python -m bench", {"fvcore": "0.1.5"})


def run_result() -> RunResult:
    metrics = {"train_step_time": timing([1.2, 1.25, 1.3]), "train_step_flops": count(1e12, "flop")}
    cases = [CaseResult("table6", "bn", {"norm": "bn"}, "ok", None, metrics, ["a note"], {"kept_per_round": 1}),
             CaseResult("table6", "gn", {"norm": "gn"}, "error", "RuntimeError: out of memory")]
    derived = [Derived("table6", "gn/bn train iter/s ratio", 0.9, 0.8, 1.0, kind="timing"),
               Derived("table6", "gn/bn train_step_flops ratio", 1.0)]
    return RunResult("cpu", "cpu", ["table6"], environment(), cases, derived)


def version_3(run: RunResult) -> dict:
    """run as schema version 3 wrote it: suffix-named summaries, samples beside the metrics, timing flags."""
    data = json.loads(results.to_json(run))
    for case in data["cases"]:
        metrics = case["metrics"]
        case["samples"] = {"train_step_s": metrics["train_step_time"]["samples"]} if "train_step_time" in metrics else {}
        flat = {name: m["value"] for name, m in metrics.items() if m["kind"] != "timing"}
        for m in metrics.values():
            if m["kind"] == "timing":
                flat.update({f"train_step_{stat}_s": m["summary"][stat] for stat in ("median", "q1", "q3", "ci_low", "ci_high")})
        case["metrics"] = flat
    for d in data["derived"]:
        d["timing"] = d.pop("kind") == "timing"
    return dict(data, schema_version=3)


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


def test_an_older_schema_is_upgraded_on_load(tmp_path):
    data = version_3(run_result())
    for case in data["cases"]:
        del case["sampling"]
    data["schema_version"] = 0
    data["ratios"] = data.pop("derived")
    for case in data["cases"]:
        del case["notes"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = results.load(path)
    assert loaded.schema_version == results.SCHEMA_VERSION
    assert loaded.derived == run_result().derived
    assert loaded.cases[0].notes == []
    assert loaded.cases[0].sampling == {"kept_per_round": 1, "discarded_per_round": 0, "order": "fixed",
                                        "cuda_cache": "not applicable"}
    assert loaded.cases[0].metrics == run_result().cases[0].metrics  # kinds, units, samples and summary


def test_version_3_metrics_get_their_kind_and_unit(tmp_path):
    data = version_3(run_result())
    data["cases"][0]["metrics"].update(peak_allocated_bytes=7e9, counted_total_bytes=5e8, cbn_layers=16)
    path = tmp_path / "v3.json"
    path.write_text(json.dumps(data))
    metrics = results.load(path).cases[0].metrics
    assert {name: (m.kind, m.unit) for name, m in metrics.items()} == {
        "train_step_flops": ("count", "flop"), "peak_allocated_bytes": ("peak", "byte"),
        "counted_total_bytes": ("count", "byte"), "cbn_layers": ("count", "1"), "train_step_time": ("timing", "s")}
    assert metrics["train_step_time"].samples == (1.2, 1.25, 1.3)


def test_version_1_learns_which_derived_figures_are_timing(tmp_path):
    data = version_3(run_result())
    data["schema_version"] = 1
    for d in data["derived"]:
        del d["timing"]
    data["derived"].append({"suite": "gradpath", "name": "time slope in C, efficient 3x3", "value": 1.9})
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    run, stored = results.load_with_version(path)
    assert stored == 1 and run.schema_version == results.SCHEMA_VERSION
    assert [d.timing for d in run.derived] == [True, False, True]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON results file"),
    (json.dumps({"benchmarks": []}), "not a cbn-bench results file"),
    (json.dumps({"schema": "cbn-bench/results", "schema_version": 99}), "schema version 99 is newer"),
    (json.dumps({"schema": "cbn-bench/results", "schema_version": 2, "profile": "cpu"}), "malformed results file"),
])
def test_foreign_or_malformed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ResultsFileError, match=message):
        results.load(path)


def test_every_committed_results_file_loads_through_the_upgrade_chain():
    root = Path(__file__).resolve().parents[1] / "results"
    files = [p for p in root.rglob("*.json") if p.parent.name not in ("counts", "profiles")]  # their own schemas
    assert len(files) >= 10
    for path in files:
        run = sources.load_source(path)  # results files and pytest-benchmark files alike
        assert run.metrics, path


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ResultsFileError, match="no such results file"):
        results.load(tmp_path / "absent.json")
