"""Suite definitions: cases, derived ratios and tables from known results, repeatable counts."""

import dataclasses

import pytest

from bench.results import CaseResult, RunResult
from suites import gradpath, table6
from test_results import environment


def timing_case(suite, name, params, seconds, **metrics):
    samples = [seconds * f for f in (0.98, 1.0, 1.02)]
    key = "train_step_s" if suite == "table6" else "stat_grad_s"
    all_samples = {key: samples}
    stem = key.removesuffix("_s")
    metrics[f"{stem}_median_s"] = seconds
    if suite == "table6":
        all_samples["inference_s"] = [s / 2 for s in samples]
        metrics["inference_median_s"] = seconds / 2
    return CaseResult(suite, name, params, "ok", None, metrics, all_samples)


def test_table6_cases_and_options():
    names = [c.name for c in table6.cases("cpu", "cpu")]
    assert names == ["bn", "gn", "syncbn", "cbn", "naive_cbn", "none"]
    everywhere = table6.cases("cpu", "cpu", {"placement": "all", "arch": "faster_rcnn", "depth": "101"})
    assert "none" not in [c.name for c in everywhere]
    assert everywhere[0].params["placement"] == "all" and everywhere[0].params["depth"] == "101"
    assert {c.group for c in everywhere} == {"table6"}  # all norms timed interleaved
    with pytest.raises(ValueError, match="table6 has no option size"):
        table6.cases("cpu", "cpu", {"size": "1"})


def test_table6_ratios_from_known_results():
    params = {"arch": "mask_rcnn", "depth": "50", "placement": "heads", "profile": "cpu"}
    bn = timing_case("table6", "bn", params, 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    cbn = timing_case("table6", "cbn", params, 1.25, train_step_flops=113.0, forward_macs=50.0, counted_total_bytes=1020.0)
    failed = CaseResult("table6", "gn", params, "error", "RuntimeError: out of memory")
    derived = {d.name: d for d in table6.derive([bn, cbn, failed])}
    assert derived["cbn/bn train_step_flops ratio"].value == pytest.approx(1.13)
    assert derived["cbn/bn memory ratio"].value == pytest.approx(1.02)
    assert derived["cbn/bn train iter/s ratio"].value == pytest.approx(0.8)
    assert derived["cbn/bn step-time ratio over training-FLOP ratio"].value == pytest.approx(1.25 / 1.13)
    assert not any(name.startswith("gn/") for name in derived)
    run = RunResult("cpu", "cpu", ["table6"], environment(), [bn, failed, cbn], list(derived.values()))
    (table,) = table6.tables(run)
    rows = {row[0]: row for row in table.rows}
    assert rows["GN"][1].startswith("error: RuntimeError: out of memory")
    assert rows["CBN k=4"][4].startswith("0.8 (0.800 [")
    assert rows["CBN k=4"][6] == "1.07 / 1.13 / 0.77 / 1"
    assert any("ABOVE the 1.05 target" in line for line in table.caption)


def test_gradpath_speedup_and_slopes_from_known_results():
    cases = []
    for c in (16, 32, 64):
        for path, seconds in (("efficient", 1e-6 * c**2), ("naive", 1e-8 * c**3)):
            params = {"profile": "cpu", "path": path, "kernel": 3, "channels": c}
            cases.append(timing_case("gradpath", f"{path}-3x3-C{c}", params, seconds, stored_bytes_per_step=float(c)))
    derived = {d.name: d.value for d in gradpath.derive(cases)}
    assert derived["time slope in C, efficient 3x3"] == pytest.approx(2.0)
    assert derived["time slope in C, naive 3x3"] == pytest.approx(3.0)
    assert derived["speedup 3x3 C=64"] == pytest.approx(1e-8 * 64**3 / (1e-6 * 64**2))


def test_gradpath_naive_path_is_skipped_over_its_memory_budget(monkeypatch):
    monkeypatch.setitem(gradpath.PROFILES, "smoke", dataclasses.replace(gradpath.PROFILES["smoke"], naive_budget_bytes=1000))
    case = gradpath.cases("smoke", "cpu")[1]
    assert case.params["path"] == "naive"
    measured = gradpath.build(case, "cpu").measure()
    assert measured.status == "skipped" and "over the 1000 B budget" in measured.notes[0]


def test_gradpath_paths_agree_within_one_run():
    case = next(c for c in gradpath.cases("smoke", "cpu") if c.params["path"] == "naive")
    measured = gradpath.build(case, "cpu").measure()
    assert measured.error is None
    assert measured.metrics["max_relative_difference_to_efficient"] < gradpath.AGREEMENT_TOLERANCE


@pytest.mark.slow
def test_table6_counts_repeat_exactly():
    case = next(c for c in table6.cases("smoke", "cpu") if c.name == "cbn")
    first, second = (table6.build(case, "cpu").measure().metrics for _ in range(2))
    for key in ("train_step_flops", "forward_macs", "inference_forward_macs", "counted_total_bytes", "cbn_history_bytes"):
        assert first[key] == second[key], key
    assert first["cbn_history_bytes"] > 0 and first["cbn_layers"] == 16
