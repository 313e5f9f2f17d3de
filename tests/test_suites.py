"""Suite definitions: the contract, cases, derived ratios and tables from known results (rendered
from the settings stored in them), repeatable counts."""

import dataclasses
import types

import pytest
from test_results import environment

from bench import codec, session
from bench.metrics import count, timing
from bench.results import CaseResult, RunResult
from bench.suite import check_suite, load_suite
from bench.training_modes import Mode
from suites import SUITES, classify, gradpath, table6
from suites.constants import AGREEMENT_TOLERANCE


def timing_case(suite, name, settings, seconds, **counts):
    samples = [seconds * f for f in (0.98, 1.0, 1.02)]
    metrics = {key: count(value, "byte" if key.endswith("bytes") else "flop") for key, value in counts.items()}
    metrics["stat_grad_time" if suite == "gradpath" else "train_step_time"] = timing(samples)
    if suite != "gradpath":
        metrics["inference_time"] = timing([s / 2 for s in samples])
    return CaseResult(suite, name, codec.encode(settings), "ok", None, metrics, mode=None if suite == "gradpath" else Mode())


def t6(name: str, seconds: float, **counts) -> CaseResult:
    """A table6 case of the cpu profile, as stored (its settings in JSON form)."""
    norm, options, _ = table6.NORMS[name]
    settings = table6.Settings(table6.PROFILES["cpu"], norm, options, "mask_rcnn", 50, "heads")
    return timing_case("table6", name, settings, seconds, **counts)


@pytest.mark.parametrize("name", SUITES)
def test_every_registered_suite_satisfies_the_contract(name):
    suite = load_suite(SUITES, name)
    assert suite.NAME == name and suite.default_profile("cpu") in suite.PROFILES


def test_a_run_naming_no_profile_takes_quick_on_cpu_and_paper_on_cuda():
    # quick keeps the README's `nox -s bench` (every suite) within half an hour on 2 cores
    assert session.plan([], None, "cpu").profile == "quick"
    assert {load_suite(SUITES, name).default_profile("cuda") for name in SUITES} == {"paper"}


def test_a_module_missing_part_of_the_contract_is_refused_naming_each_gap():
    module = types.ModuleType("half_a_suite")
    module.NAME, module.PROFILES, module.cases = "half", {"smoke": "tiny"}, lambda *a: []
    with pytest.raises(ValueError, match=r"half_a_suite does not satisfy bench.suite.Suite: it lacks default_profile "
                                         r"\(a function\), build .* SETTINGS \(a dataclass\), PROFILES \(a non-empty dict .*OPTIONS .*COUNTS"):
        check_suite(module)


def test_table6_cases_and_options():
    names = [c.name for c in table6.cases("cpu", "cpu")]
    assert names == ["bn", "gn", "syncbn", "cbn", "naive_cbn", "none", "bn_control"]
    everywhere = table6.cases("cpu", "cpu", {"placement": "all", "arch": "faster_rcnn", "depth": "101"})
    assert "none" not in [c.name for c in everywhere]
    assert everywhere[0].settings.placement == "all" and everywhere[0].settings.depth == 101
    assert {c.group for c in everywhere} == {"table6"}  # all norms timed interleaved
    with pytest.raises(ValueError, match="table6 has no option size"):
        table6.cases("cpu", "cpu", {"size": "1"})


def test_table6_ratios_from_known_results():
    bn = t6("bn", 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    cbn = t6("cbn", 1.25, train_step_flops=113.0, forward_macs=50.0, counted_total_bytes=1020.0)
    failed = dataclasses.replace(t6("gn", 1.0), status="error", error="RuntimeError: out of memory", metrics={})
    derived = {d.id.key: d for d in table6.derive([bn, cbn, failed])}
    assert derived["cbn/train_step_flops/ratio_to:bn"].value == pytest.approx(1.13)
    assert derived["cbn/memory/ratio_to:bn"].value == pytest.approx(1.02)
    assert derived["cbn/train_iter_per_s/ratio_to:bn"].value == pytest.approx(0.8)
    assert derived["cbn/step_time_over_flops/ratio_to:bn"].value == pytest.approx(1.25 / 1.13)
    assert not any(key.startswith("gn/") for key in derived)
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

    def measured(model, norm, seconds, flops):
        settings = classify.Settings(classify.PROFILES["cpu"], model, norm)
        return timing_case("classify", f"{model}/{norm}", settings, seconds, train_step_flops=flops,
                           forward_macs=flops / 6, counted_total_bytes=1000.0)

    results = [measured("resnet18", "bn", 1.0, 100.0), measured("resnet18", "cbn", 1.5, 134.0),
               measured("resnet50", "bn", 2.0, 300.0), measured("resnet50", "gn", 2.2, 300.0)]
    derived = {d.id.key: d for d in classify.derive(results)}
    assert derived["resnet18/cbn/train_iter_per_s/ratio_to:bn"].value == pytest.approx(1 / 1.5)
    check = derived["resnet18/cbn/step_time_over_flops/ratio_to:bn"]
    assert check.value == pytest.approx(1.5 / 1.34)
    # the time ratio's paired interval over the exact FLOP ratio: every round gives the same ratio
    # (both cases' samples span 0.98-1.02 of their medians in step), so the interval closes on it
    assert check.ci_low == pytest.approx(check.value) == pytest.approx(check.ci_high)
    assert derived["resnet50/gn/train_iter_per_s/ratio_to:bn"].value == pytest.approx(1 / 1.1)
    assert not any(key.startswith("resnet50/cbn") for key in derived)  # no CBN case for that model
    run = RunResult("cpu", "cpu", ["classify"], environment(), results, list(derived.values()))
    r18, r50 = classify.tables(run)
    assert "ResNet-18" in r18.title and "4 x 224x224 images" in r18.title and "ResNet-50" in r50.title
    assert {row[0]: row for row in r18.rows}["CBN k=4"][4].startswith("0.667 (0.667 [")
    interval = f"[95% CI {check.ci_low:.3f}-{check.ci_high:.3f}]"
    assert any(f"1.119 {interval} (ABOVE the 1.08 target on cpu, a goal" in line for line in r18.caption)


def test_a_file_renders_the_sizes_it_was_measured_at_after_its_profile_changed(monkeypatch):
    bn = t6("bn", 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    run = RunResult("cpu", "cpu", ["table6"], environment(), [bn], table6.derive([bn]))
    monkeypatch.setitem(table6.PROFILES, "cpu", dataclasses.replace(table6.PROFILES["cpu"], height_px=64, width_px=64))
    (table,) = table6.tables(run)
    assert "2 x 320x320 images" in table.title


def test_gradpath_speedup_and_slopes_from_known_results():
    cases = []
    for c in (16, 32, 64):
        for path, seconds in (("efficient", 1e-6 * c**2), ("naive", 1e-8 * c**3)):
            settings = gradpath.Settings(gradpath.PROFILES["cpu"], path, 3, c)
            cases.append(timing_case("gradpath", f"{path}-3x3-C{c}", settings, seconds, stored_bytes_per_step=float(c)))
    derived = {d.id.key: d.value for d in gradpath.derive(cases)}
    assert derived["efficient-3x3/stat_grad_time/loglog_slope_in:C"] == pytest.approx(2.0)
    assert derived["naive-3x3/stat_grad_time/loglog_slope_in:C"] == pytest.approx(3.0)
    assert derived["naive-3x3-C64/stat_grad_time/ratio_to:efficient"] == pytest.approx(1e-8 * 64**3 / (1e-6 * 64**2))
    assert derived["naive-3x3-C64/stored_bytes_per_step/ratio_to:efficient"] == 1.0


def test_gradpath_naive_path_is_skipped_over_its_memory_budget(monkeypatch):
    monkeypatch.setitem(gradpath.PROFILES, "smoke", dataclasses.replace(gradpath.PROFILES["smoke"], naive_budget_bytes=1000))
    case = gradpath.cases("smoke", "cpu")[1]
    assert case.settings.path == "naive"
    measured = gradpath.build(case, "cpu").measure()
    assert measured.status == "skipped" and "over the 1000 B budget" in measured.notes[0]


def test_gradpath_paths_agree_within_one_run():
    case = next(c for c in gradpath.cases("smoke", "cpu") if c.settings.path == "naive")
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


def test_a_timed_round_is_a_block_of_steps_then_a_block_of_inference_on_frozen_weights(monkeypatch):
    """model.eval() reads CBN's device-side non-finite count (a host sync per layer): not timed.
    Inference calls follow one another, not each after a training step (the weights stay frozen)."""
    import torch
    from torch import nn

    from suites import workload

    modes_when_timed, calls = [], []

    def time_call(fn, device):
        modes_when_timed.append(workload_under_test.model.training)
        fn()
        return float(len(calls))

    class Workload(workload.TrainingWorkload):
        model, device = nn.Linear(2, 2), torch.device("cpu")

        def train_step(self):
            calls.append("train")
            self.model.train()

        def inference(self):
            calls.append("inference")
            self.model.eval()

    monkeypatch.setattr(workload, "time_call", time_call)
    workload_under_test = Workload()
    assert workload_under_test.timed_round(kept=2, discarded=1) == {"train_step_time": [2.0, 3.0],
                                                                    "inference_time": [5.0, 6.0]}
    assert calls == ["train"] * 3 + ["inference"] * 3
    assert modes_when_timed == [True] * 3 + [False] * 3  # each inference clock started in eval mode


def test_the_a_a_control_passes_within_its_margin_and_says_so_when_it_does_not():
    bn = t6("bn", 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    same = t6("bn_control", 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    derived = {d.id.key: d for d in table6.derive([bn, same])}
    check = derived["bn_control/train_iter_per_s_interval_deviation/ratio_to:bn"]
    assert check.kind == "timing" and check.value == pytest.approx(0.0, abs=1e-12)  # the same samples, round by round
    run = RunResult("cpu", "cpu", ["table6"], environment(), [bn, same], list(derived.values()))
    (table,) = table6.tables(run)
    assert any(line.startswith("A/A control, train iter/s: BN/BN = 1.000 [1.000, 1.000], within the +-30% margin")
               for line in table.caption)
    noisy_metrics = dict(same.metrics, train_step_time=timing([1.0, 1.3, 0.8, 1.2, 0.9]))
    noisy = dataclasses.replace(same, metrics=noisy_metrics)
    derived = {d.id.key: d for d in table6.derive([bn, noisy])}
    assert derived["bn_control/train_iter_per_s_interval_deviation/ratio_to:bn"].value > 0.30
    (table,) = table6.tables(RunResult("cpu", "cpu", ["table6"], environment(), [bn, noisy], list(derived.values())))
    assert any("OUTSIDE the +-30% margin on cpu: this run's noise is too large" in line for line in table.caption)


def test_a_missing_metric_leaves_its_cells_and_ratios_out_and_the_caption_says_why():
    bn = t6("bn", 1.0, train_step_flops=100.0, forward_macs=40.0, counted_total_bytes=1000.0)
    cbn = t6("cbn", 1.25, train_step_flops=113.0, counted_total_bytes=1020.0)
    cbn = dataclasses.replace(cbn, missing={"forward_macs": "RuntimeError: fvcore could not trace"})
    derived = {d.id.key: d for d in table6.derive([bn, cbn])}
    assert "cbn/forward_macs/ratio_to:bn" not in derived and "cbn/train_iter_per_s/ratio_to:bn" in derived
    (table,) = table6.tables(RunResult("cpu", "cpu", ["table6"], environment(), [bn, cbn], list(derived.values())))
    assert {row[0]: row for row in table.rows}["CBN k=4"][2] == "missing"
    assert "CBN k=4: forward_macs missing (RuntimeError: fvcore could not trace)" in table.caption


@pytest.mark.slow
def test_every_table6_norm_pools_the_same_boxes_in_training_and_inference():
    stored = {"metrics": {"train_step_flops": 1.0, "forward_macs": 2.0, "inference_forward_macs": 3.0},
              "counted_on": "cpu", "date_utc": "2026-12-04T00:00:00", "torch": "2", "torchvision": "0"}
    works = {}
    for case in table6.cases("smoke", "cpu"):  # every norm, the A/A control's included
        workload = table6.build(case, "cpu")
        workload.reuse_counts(stored)  # counting is not what this test is about
        works[case.name] = workload.measure().work
    assert set(works) == set(table6.NORMS)
    assert set(works["bn"]) == {"train box RoIs", "train mask RoIs", "inference box RoIs", "inference mask RoIs"}
    assert all(work == works["bn"] for work in works.values()), works


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_proposals_fill_the_samplers_quotas_so_its_random_draw_cannot_change_them(seed):
    import torch
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.ops import boxes as box_ops

    from suites.data import synthetic_batch
    from suites.models import quota_filling_proposals

    _, targets = synthetic_batch(2, 96, 128, seed=3)
    heads = RoIHeads(None, None, None, 0.5, 0.5, 32, table6.POSITIVE_FRACTION, None, 0.05, 0.5, 100)
    proposals = [quota_filling_proposals(t["boxes"], (96, 128), 32, table6.POSITIVE_FRACTION,
                                         torch.Generator().manual_seed(0)) for t in targets]
    best_iou = box_ops.box_iou(proposals[0], targets[0]["boxes"]).max(dim=1).values
    assert (best_iou >= 0.5).sum() == 8 - 7 and (best_iou < 0.5).sum() == 24  # with the 7 objects: 8 + 24
    torch.manual_seed(seed)  # the sampler's draw
    sampled, _, labels, _ = heads.select_training_samples(proposals, targets)
    torch.manual_seed(100 + seed)
    again, _, _, _ = heads.select_training_samples(proposals, targets)
    assert all(torch.equal(a, b) for a, b in zip(sampled, again))
    assert [len(s) for s in sampled] == [32, 32] and [int((lab > 0).sum()) for lab in labels] == [8, 8]
    assert isinstance(heads.fg_bg_sampler, det_utils.BalancedPositiveNegativeSampler)
    with pytest.raises(ValueError, match="16 sampled RoIs per image leave 4 positives, fewer than the 7"):
        quota_filling_proposals(targets[0]["boxes"], (96, 128), 16, 0.25, torch.Generator())


@pytest.mark.slow
def test_a_failing_flop_trace_costs_the_case_those_counts_only(monkeypatch):
    from bench import flops

    def broken_trace(*args, **kwargs):
        raise RuntimeError("fvcore could not trace this graph")

    monkeypatch.setattr(flops, "fvcore_forward_flops", broken_trace)
    case = next(c for c in table6.cases("smoke", "cpu") if c.name == "bn")
    workload = table6.build(case, "cpu")
    measured = workload.measure()
    assert measured.missing == {"forward_macs": "RuntimeError: fvcore could not trace this graph",
                                "inference_forward_macs": "RuntimeError: fvcore could not trace this graph"}
    assert measured.metrics["train_step_flops"].value > 0 and measured.metrics["counted_total_bytes"].value > 0
    assert set(measured.work) == {"train box RoIs", "train mask RoIs", "inference box RoIs", "inference mask RoIs"}
    workload.warmup()
    assert set(workload.timed_round(kept=1, discarded=0)) == {"train_step_time", "inference_time"}  # still timed
