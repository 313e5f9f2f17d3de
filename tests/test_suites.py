"""Suite definitions: the contract, cases, derived ratios and tables from known results (rendered
from the settings stored in them), repeatable counts."""

import dataclasses
import types

import pytest

from bench.metrics import count, timing
from bench.results import CaseResult, RunResult
from bench.suite import check_suite, load_suite
from suites import SUITES, classify, gradpath, table6
from suites.constants import AGREEMENT_TOLERANCE
from test_results import environment


def timing_case(suite, name, params, seconds, **counts):
    samples = [seconds * f for f in (0.98, 1.0, 1.02)]
    metrics = {key: count(value, "byte" if key.endswith("bytes") else "flop") for key, value in counts.items()}
    metrics["stat_grad_time" if suite == "gradpath" else "train_step_time"] = timing(samples)
    if suite != "gradpath":
        metrics["inference_time"] = timing([s / 2 for s in samples])
    return CaseResult(suite, name, params, "ok", None, metrics)


@pytest.mark.parametrize("name", SUITES)
def test_every_registered_suite_satisfies_the_contract(name):
    suite = load_suite(SUITES, name)
    assert suite.NAME == name and suite.default_profile("cpu") in suite.PROFILES


def test_a_module_missing_part_of_the_contract_is_refused_naming_each_gap():
    module = types.ModuleType("half_a_suite")
    module.NAME, module.PROFILES, module.cases = "half", {"smoke": "tiny"}, lambda *a: []
    with pytest.raises(ValueError, match=r"half_a_suite does not satisfy bench.suite.Suite: it lacks default_profile "
                                         r"\(a function\), build .* PROFILES \(a non-empty dict .*OPTIONS .*COUNTS"):
        check_suite(module)


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
    params = {"arch": "mask_rcnn", "depth": "50", "placement": "heads", "profile": "cpu",
              "settings": table6.settings(table6.PROFILES["cpu"])}
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
    assert any("ABOVE the 1.10 target on cpu, which the gate enforces too" in line for line in table.caption)
    assert "2 x 320x320 images, 128 RoIs/image" in table.title


def test_classify_cases_group_each_model_and_ratios_stay_within_it():
    cases = classify.cases("cpu", "cpu")
    assert [c.name for c in cases][:4] == ["resnet18/bn", "resnet18/gn", "resnet18/cbn", "resnet18/naive_cbn"]
    assert {c.group for c in cases} == {"resnet18", "resnet50"}  # norms timed interleaved per model
    with pytest.raises(ValueError, match="classify has no option depth"):
        classify.cases("cpu", "cpu", {"depth": "50"})
    settings = classify.settings(classify.PROFILES["cpu"])

    def measured(model, norm, seconds, flops):
        params = {"profile": "cpu", "settings": settings, "model": model, "norm": norm}
        return timing_case("classify", f"{model}/{norm}", params, seconds, train_step_flops=flops, forward_macs=flops / 6,
                           counted_total_bytes=1000.0)

    results = [measured("resnet18", "bn", 1.0, 100.0), measured("resnet18", "cbn", 1.5, 134.0),
               measured("resnet50", "bn", 2.0, 300.0), measured("resnet50", "gn", 2.2, 300.0)]
    derived = {d.name: d for d in classify.derive(results)}
    assert derived["resnet18.cbn/bn train iter/s ratio"].value == pytest.approx(1 / 1.5)
    check = derived["resnet18.cbn/bn step-time ratio over training-FLOP ratio"]
    assert check.value == pytest.approx(1.5 / 1.34)
    # the time ratio's bootstrap interval over the exact FLOP ratio: the samples span 0.98-1.02 of each median
    assert 1.5 / 1.34 * 0.98 / 1.02 <= check.ci_low < check.value < check.ci_high <= 1.5 / 1.34 * 1.02 / 0.98
    assert derived["resnet50.gn/bn train iter/s ratio"].value == pytest.approx(1 / 1.1)
    assert not any(name.startswith("resnet50.cbn") for name in derived)  # no CBN case for that model
    run = RunResult("cpu", "cpu", ["classify"], environment(), results, list(derived.values()))
    r18, r50 = classify.tables(run)
    assert "ResNet-18" in r18.title and "4 x 224x224 images" in r18.title and "ResNet-50" in r50.title
    assert {row[0]: row for row in r18.rows}["CBN k=4"][4].startswith("0.667 (0.667 [")
    interval = f"[95% CI {check.ci_low:.3f}-{check.ci_high:.3f}]"
    assert any(f"1.119 {interval} (ABOVE the 1.08 target on cpu, a goal" in line for line in r18.caption)


def test_a_file_renders_the_sizes_it_was_measured_at_after_its_profile_changed(monkeypatch):
    params = {"arch": "mask_rcnn", "depth": "50", "placement": "heads", "profile": "cpu",
              "settings": table6.settings(table6.PROFILES["cpu"])}
    bn = timing_case("table6", "bn", params, 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    run = RunResult("cpu", "cpu", ["table6"], environment(), [bn], table6.derive([bn]))
    monkeypatch.setitem(table6.PROFILES, "cpu", dataclasses.replace(table6.PROFILES["cpu"], height_px=64, width_px=64))
    (table,) = table6.tables(run)
    assert "2 x 320x320 images" in table.title
    # a file from before settings were stored renders with the profile as it was then, not today's
    old = dataclasses.replace(bn, params={k: v for k, v in params.items() if k != "settings"})
    (table,) = table6.tables(RunResult("cpu", "cpu", ["table6"], environment(), [old], []))
    assert "2 x 320x320 images" in table.title


def test_gradpath_speedup_and_slopes_from_known_results():
    cases = []
    for c in (16, 32, 64):
        for path, seconds in (("efficient", 1e-6 * c**2), ("naive", 1e-8 * c**3)):
            params = {"profile": "cpu", "path": path, "kernel": 3, "channels": c,
                      "settings": gradpath.settings(gradpath.PROFILES["cpu"])}
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
    assert measured.metrics["max_relative_difference_to_efficient"].value < AGREEMENT_TOLERANCE


@pytest.mark.slow
def test_table6_counts_repeat_exactly():
    case = next(c for c in table6.cases("smoke", "cpu") if c.name == "cbn")
    first, second = (table6.build(case, "cpu").measure().metrics for _ in range(2))
    for key in ("train_step_flops", "forward_macs", "inference_forward_macs", "counted_total_bytes", "cbn_history_bytes"):
        assert first[key] == second[key], key
    assert first["cbn_history_bytes"].value > 0 and first["cbn_layers"].value == 16


@pytest.mark.slow
def test_table6_reuses_stored_counts_and_says_so():
    case = next(c for c in table6.cases("smoke", "cpu") if c.name == "bn")
    workload = table6.build(case, "cpu")
    stored = {"train_step_flops": 1.0, "forward_macs": 2.0, "inference_forward_macs": 3.0}
    workload.reuse_counts({"metrics": stored, "counted_on": "cpu: elsewhere", "date_utc": "2026-11-27T00:00:00",
                           "torch": "2.11.0", "torchvision": "0.26.0"})
    measured = workload.measure()
    assert {k: measured.metrics[k].value for k in stored} == stored
    assert "reused from results/counts, counted on cpu: elsewhere" in measured.notes[0]
    assert measured.metrics["counted_total_bytes"].value > 0  # memory is still measured here


def test_a_timed_round_leaves_training_before_the_inference_clock_starts(monkeypatch):
    """model.eval() reads CBN's device-side non-finite count (a host sync per layer): not timed."""
    import torch
    from torch import nn

    from suites import workload

    modes_when_timed = []

    def time_call(fn, device):
        modes_when_timed.append(workload_under_test.model.training)
        fn()
        return 1.0

    class Workload(workload.TrainingWorkload):
        model, device = nn.Linear(2, 2), torch.device("cpu")

        def train_step(self):
            self.model.train()

        def inference(self):
            self.model.eval()

    monkeypatch.setattr(workload, "time_call", time_call)
    workload_under_test = Workload()
    assert workload_under_test.timed_round() == {"train_step_time": 1.0, "inference_time": 1.0}
    assert modes_when_timed == [True, False]  # the inference clock started with the model already in eval
