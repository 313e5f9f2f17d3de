"""The regression gate on the committed baselines and thresholds: it passes on itself and on
improvements, fails (exit 1, metric named) on injected regressions, re-measures a failed timing
rule once, and refuses unlike comparisons (exit 2)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from bench import cli, pytest_suites, results, session
from bench.gate import commands, sources, thresholds, verdicts
from bench.gate.sources import GatedValue, Source
from bench.suite import load_suite
from bench.training_modes import Mode

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "results" / "baselines" / "cpu" / "quick.json"
MICRO_BASELINE = ROOT / "results" / "baselines" / "cpu" / "micro.json"
GPU_BASELINE = ROOT / "results" / "baselines" / "nvidia-h100-80gb-hbm3" / "paper.json"
GPU_MICRO_BASELINE = ROOT / "results" / "baselines" / "nvidia-h100-80gb-hbm3" / "micro.json"
THRESHOLDS = ROOT / "results" / "thresholds.toml"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The gate's table at a terminal's usual width would wrap its notes mid-phrase in captured output."""
    from bench import session

    monkeypatch.setattr(session.console, "width", 250)


def run_gate(capsys, *files: Path, baseline=(BASELINE, MICRO_BASELINE), rules: Path = THRESHOLDS) -> tuple[int, str]:
    code = cli.main(["gate", "--results", *map(str, files), "--baseline", *map(str, baseline), "--thresholds", str(rules)])
    return code, " ".join(capsys.readouterr().out.split())


def edited(tmp_path: Path, source: Path, edit, name: str = "current.json") -> Path:
    data = copy.deepcopy(json.loads(source.read_text()))
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def case(data: dict, suite: str, name: str) -> dict:
    return next(c for c in data["cases"] if c["suite"] == suite and c["case"] == name)


def derived(data: dict, suite: str, name: str) -> dict:
    """The derived figure of suite whose id's key is name (bench.results.FigureId.key)."""
    return next(d for d in data["derived"] if d["id"]["suite"] == suite and _key(d["id"]) == name)


def _key(figure: dict) -> str:
    return "/".join(part for part in (figure["subject"], figure["quantity"], figure["reference"]) if part)


def scale(data: dict, suite: str, name: str, metric: str, factor: float) -> None:
    metrics = case(data, suite, name)["metrics"]
    if isinstance(metrics[metric], dict):
        metrics[metric]["value"] *= factor
    else:  # schema 3 and older (the first H100 files) stored bare numbers
        metrics[metric] *= factor


def scale_micro(data: dict, group: str, norm: str, factor: float) -> None:
    bench = next(b for b in data["benchmarks"] if b["group"] == group and b["extra_info"]["norm"] == norm)
    bench["stats"]["data"] = [t * factor for t in bench["stats"]["data"]]


# ---------------------------------------------------------------------- the committed baselines
def test_the_baselines_pass_against_themselves_with_every_rule_matched(capsys):
    code, out = run_gate(capsys, BASELINE, MICRO_BASELINE)
    assert code == 0, out
    assert "0 fail, 0 missing, 0 new" in out and "gate passed" in out


def test_every_label_renamed_the_gate_still_passes_and_the_tables_read_the_same(tmp_path, capsys):
    def rename(data: dict) -> None:
        for i, figure in enumerate(data["derived"]):
            figure["label"] = f"renamed figure {i}"

    renamed = edited(tmp_path, BASELINE, rename)
    code, out = run_gate(capsys, renamed, MICRO_BASELINE)
    assert code == 0 and "0 fail, 0 missing, 0 new" in out, out
    original, relabelled = results.load(BASELINE), results.load(renamed)
    assert {d.label for d in relabelled.derived} != {d.label for d in original.derived}
    for name in original.suites:
        suite = load_suite(session.suite_registry(), name)
        assert suite.tables(relabelled) == suite.tables(original), name


@pytest.mark.parametrize("metric, edit", [
    ("table6.cbn.train_step_flops", lambda d: scale(d, "table6", "cbn", "train_step_flops", 1.2)),
    ("table6.cbn.cbn_history_bytes", lambda d: scale(d, "table6", "cbn", "cbn_history_bytes", 3)),
    ("table6.cbn/train_iter_per_s/ratio_to:bn", lambda d: derived(d, "table6", "cbn/train_iter_per_s/ratio_to:bn").update(
        value=0.75 * derived(d, "table6", "cbn/train_iter_per_s/ratio_to:bn")["value"])),
    ("gradpath.naive-3x3-C256/stat_grad_time/ratio_to:efficient",
     lambda d: derived(d, "gradpath", "naive-3x3-C256/stat_grad_time/ratio_to:efficient").update(
         value=derived(d, "gradpath", "naive-3x3-C256/stat_grad_time/ratio_to:efficient")["value"] / 3)),
    ("gradpath.efficient-3x3-C256.stored_bytes_per_step",
     lambda d: scale(d, "gradpath", "efficient-3x3-C256", "stored_bytes_per_step", 2)),
    ("table6.bn_control/train_iter_per_s_interval_deviation/ratio_to:bn",  # an A/A control outside its margin
     lambda d: derived(d, "table6", "bn_control/train_iter_per_s_interval_deviation/ratio_to:bn").update(value=0.35)),
    ("classify.resnet18/bn_control/inference_iter_per_s_interval_deviation/ratio_to:bn",
     lambda d: derived(d, "classify", "resnet18/bn_control/inference_iter_per_s_interval_deviation/ratio_to:bn").update(
         value=0.31)),
])
def test_an_injected_regression_fails_with_the_metric_named(tmp_path, capsys, metric, edit):
    code, out = run_gate(capsys, edited(tmp_path, BASELINE, edit), MICRO_BASELINE)
    assert code == 1
    assert "gate failed: 1 of" in out and out.rstrip().endswith(metric)


def test_a_slower_efficient_path_in_the_micro_benchmarks_fails(tmp_path, capsys):
    slower = edited(tmp_path, MICRO_BASELINE, lambda d: scale_micro(d, "forward+backward", "cbn", 1.5), "micro.json")
    code, out = run_gate(capsys, BASELINE, slower)
    assert code == 1
    assert out.rstrip().endswith("micro.forward+backward/cbn/min_time/ratio_to:bn")
    assert "timing; not re-measured (--results)" in out


def test_a_micro_benchmark_control_that_strays_from_bn_fails(tmp_path, capsys):
    strayed = edited(tmp_path, MICRO_BASELINE, lambda d: scale_micro(d, "forward", "bn-control", 1.6), "micro.json")
    code, out = run_gate(capsys, BASELINE, strayed)
    assert code == 1
    assert out.rstrip().endswith("micro.forward/bn-control/min_time/ratio_to:bn")


def test_improvements_pass(tmp_path, capsys):
    def improve(d):
        for name, factor in (("cbn/train_iter_per_s/ratio_to:bn", 1.2), ("naive-3x3-C256/stat_grad_time/ratio_to:efficient", 2.0)):
            derived(d, "table6" if "iter_per_s" in name else "gradpath", name)["value"] *= factor

    faster = edited(tmp_path, MICRO_BASELINE, lambda d: scale_micro(d, "forward+backward", "cbn", 0.7), "micro.json")
    code, out = run_gate(capsys, edited(tmp_path, BASELINE, improve), faster)
    assert code == 0, out


def test_a_failed_case_lists_its_metrics_as_missing(tmp_path, capsys):
    def crash(d):
        c = case(d, "table6", "cbn")
        c.update(status="error", error="RuntimeError: out of memory", metrics={})
        d["derived"] = [x for x in d["derived"] if x["id"]["subject"] != "cbn"]

    code, out = run_gate(capsys, edited(tmp_path, BASELINE, crash), MICRO_BASELINE)
    assert code == 1
    assert "MISSING" in out and "case cbn error:" in out
    assert "table6.cbn/train_iter_per_s/ratio_to:bn" in out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(profile="cpu"), "the baseline {b} is profile 'quick', the current {c} is 'cpu'"),
    (lambda d: d.update(device="cuda", environment=dict(d["environment"], device_name="NVIDIA H100 80GB HBM3")),
     "is device class 'cpu', the current {c} is 'nvidia-h100-80gb-hbm3'"),
    (lambda d: [c["settings"]["profile"].update(rounds=99) for c in d["cases"] if c["suite"] == "table6"],
     "table6 in the baseline {b} was measured with other settings than in {c}"),
])
def test_unlike_comparisons_are_refused_with_exit_2(tmp_path, capsys, edit, message):
    current = edited(tmp_path, BASELINE, edit)
    code, out = run_gate(capsys, current, MICRO_BASELINE)
    assert code == 2
    assert "refusing to compare" in out
    assert " ".join(message.format(b=BASELINE, c=current).split()) in out


def test_micro_files_compare_on_what_decides_the_measurement_not_on_descriptions(tmp_path, capsys):
    def described(d):  # the baseline predates extra_info["subject"]; a run today records it
        for bench in d["benchmarks"]:
            bench["extra_info"]["subject"] = "conv 3x3 + norm, training mode"

    code, out = run_gate(capsys, BASELINE, edited(tmp_path, MICRO_BASELINE, described, "micro-now.json"))
    assert code == 0, out

    def reshaped(d):
        for bench in d["benchmarks"]:
            bench["extra_info"]["shape_nchw"] = [4, 64, 32, 48]

    code, out = run_gate(capsys, BASELINE, edited(tmp_path, MICRO_BASELINE, reshaped, "micro-other.json"))
    assert code == 2 and "micro in the baseline" in out and "was measured with other settings" in out


def test_files_written_in_different_schema_versions_are_not_compared():
    baseline = sources.load_source(BASELINE)
    newer = dataclasses.replace(baseline, path="newer.json", schema="cbn-bench/results v8")
    with pytest.raises(sources.GateError, match="is schema 'cbn-bench/results v7', the current newer.json is "
                                                "'cbn-bench/results v8'; re-measure the older one"):
        sources.check_comparable(baseline, newer)


def test_a_malformed_thresholds_file_exits_2_naming_the_line(tmp_path, capsys):
    rules = tmp_path / "thresholds.toml"
    rules.write_text('[table6]\n"*.train_step_flops" = "== baseline"\n"cbn/train_iter_per_s/ratio_to:bn" = "=> baseline"\n')
    code, out = run_gate(capsys, BASELINE, MICRO_BASELINE, rules=rules)
    assert code == 2
    assert f"{rules}:3: rule '=> baseline'" in out


def test_overlapping_rules_are_a_usage_error(tmp_path, capsys):
    rules = tmp_path / "thresholds.toml"
    rules.write_text('[table6]\n"*.train_step_flops" = "== baseline"\n"cbn.train_*" = "== baseline"\n')
    code, out = run_gate(capsys, BASELINE, rules=rules, baseline=(BASELINE,))
    assert code == 2
    assert "'table6.cbn.train_step_flops' is matched by line 2" in out and "line 3" in out


def test_a_rule_that_matches_nothing_is_listed_as_missing(tmp_path, capsys):
    rules = tmp_path / "thresholds.toml"
    rules.write_text('[table6]\n"cbn.train_step_flop" = "== baseline"\n[micro]\n"x" = "<= 2"\n')
    code, out = run_gate(capsys, BASELINE, rules=rules, baseline=(BASELINE,))
    assert code == 1
    assert "no metric of this name in the baseline or this run" in out
    assert "rules for suites not in this run, not checked: micro" in out


def test_a_metric_new_since_the_baseline_is_listed_but_passes(tmp_path, capsys):
    def add(d):
        case(d, "table6", "cbn")["metrics"]["extra_flops"] = {"value": 1.0, "kind": "count", "unit": "flop"}

    rules = tmp_path / "thresholds.toml"
    rules.write_text('[table6]\n"*.extra_flops" = "== baseline"\n"*.train_step_flops" = "== baseline"\n')
    code, out = run_gate(capsys, edited(tmp_path, BASELINE, add), rules=rules, baseline=(BASELINE,))
    assert code == 0
    assert "new" in out and "not in the baseline" in out


def test_no_baseline_for_this_device_class_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "BASELINES", tmp_path)
    code = cli.main(["gate", "--results", str(BASELINE), "--thresholds", str(THRESHOLDS)])
    assert code == 2
    assert "no baseline for profile 'quick' for device class 'cpu'" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------- re-measuring timing rules
def source(metrics: dict[str, GatedValue], suite: str = "table6") -> Source:
    return Source(f"{suite}.json", "cbn-bench/results v4", "cpu", "cpu", "quick", (suite,), metrics)


def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "thresholds.toml"
    path.write_text('[table6]\n"flops" = "== baseline"\n"ratio" = ">= baseline - 10%"\n')
    return path


def measured_gate(tmp_path, monkeypatch, capsys, measurements: list[dict[str, float]]) -> tuple[int, str, list]:
    """The measuring gate with `measure` replaced: it returns the given figures, one run per call."""
    baseline = source({"table6.flops": GatedValue(100.0, False), "table6.ratio": GatedValue(0.8, True)})
    calls = []

    def fake_measure(names, profile, device, threads, out, mode):
        figures = measurements[len(calls)]
        calls.append(list(names))
        return [source({"table6.flops": GatedValue(figures["flops"], False), "table6.ratio": GatedValue(figures["ratio"], True)})]

    monkeypatch.setattr(commands, "measure", fake_measure)
    monkeypatch.setattr(commands, "_baselines", lambda given, wanted: [baseline])
    code = cli.main(["gate", "table6", "--thresholds", str(rules_file(tmp_path)), "--device", "cpu"])
    return code, " ".join(capsys.readouterr().out.split()), calls


def test_a_failed_timing_rule_is_re_measured_once_and_may_then_pass(tmp_path, monkeypatch, capsys):
    code, out, calls = measured_gate(tmp_path, monkeypatch, capsys, [{"flops": 100, "ratio": 0.6}, {"flops": 100, "ratio": 0.79}])
    assert code == 0
    assert calls == [["table6"], ["table6"]]
    assert "timing rules failed in table6: re-measuring once" in out
    assert "re-measured once: first 0.6 failed" in out


def test_a_timing_rule_that_fails_twice_counts(tmp_path, monkeypatch, capsys):
    code, out, calls = measured_gate(tmp_path, monkeypatch, capsys, [{"flops": 100, "ratio": 0.6}, {"flops": 100, "ratio": 0.65}])
    assert code == 1 and len(calls) == 2
    assert out.rstrip().endswith("table6.ratio")


def test_a_deterministic_failure_is_never_re_measured(tmp_path, monkeypatch, capsys):
    code, out, calls = measured_gate(tmp_path, monkeypatch, capsys, [{"flops": 101, "ratio": 0.8}])
    assert code == 1 and len(calls) == 1
    assert "re-measur" not in out.replace("re-measured once before it counts", "")


# ---------------------------------------------------------------------- sources
def test_micro_ratios_are_minimum_times_over_the_groups_reference():
    run = pytest_suites.load(MICRO_BASELINE)
    fastest = {tuple(c.case.split("/")): min(c.metrics["time"].samples) for c in run.cases}
    src = sources.load_source(MICRO_BASELINE)
    value = src.metrics["micro.forward+backward/cbn/min_time/ratio_to:bn"].value
    assert value == fastest[("forward+backward", "cbn")] / fastest[("forward+backward", "bn")]
    assert "micro.forward/bn/min_time/ratio_to:bn" not in src.metrics
    counted = {name for name in src.metrics if name.endswith((".aten_ops", ".host_syncs"))}
    assert counted and not any(src.metrics[name].timing for name in counted)
    assert all(m.timing for name, m in src.metrics.items() if name not in counted)


def test_results_sources_mark_timing_metrics():
    src = sources.load_source(BASELINE)
    assert src.metrics["table6.cbn.train_step_time"].timing
    assert src.metrics["table6.cbn/train_iter_per_s/ratio_to:bn"].timing
    assert not src.metrics["table6.cbn.train_step_flops"].timing
    assert not src.metrics["table6.cbn/train_step_flops/ratio_to:bn"].timing
    assert not src.metrics["table6.cbn.peak_rss_bytes"].timing
    assert (src.device, src.device_class, src.profile, src.schema) == ("cpu", "cpu", "quick", "cbn-bench/results v7")


def test_a_foreign_file_is_refused(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
    code, out = run_gate(capsys, other)
    assert code == 2 and "neither a cbn-bench results file nor a micro-benchmark file" in out


def test_every_rule_in_the_committed_file_names_real_metrics_of_its_devices():
    rules = thresholds.load(THRESHOLDS)
    names = {"cpu": set(), "cuda": set()}
    for path in (BASELINE, MICRO_BASELINE, GPU_BASELINE, GPU_MICRO_BASELINE):
        src = sources.load_source(path)
        names[src.device] |= set(src.metrics)
    suites = {device: {name.split(".")[0] for name in found} for device, found in names.items()}
    assert suites["cpu"] == {r.suite for r in rules}  # every suite's rules are checked on some device
    unmatched = [f"{r.pattern} on {device}" for r in rules for device in names
                 if r.applies_on(device) and r.suite in suites[device] and not any(r.matches(n) for n in names[device])]
    assert unmatched == [f"{name} on cuda" for name in CONTROL_CHECKS]  # the H100 files predate them (one per rule)


def test_spread_reports_the_widest_pairwise_drift_of_timing_metrics(tmp_path, capsys):
    slower = edited(tmp_path, BASELINE, lambda d: derived(d, "table6", "cbn/train_iter_per_s/ratio_to:bn").update(
        value=1.1 * derived(d, "table6", "cbn/train_iter_per_s/ratio_to:bn")["value"]))
    assert cli.main(["spread", str(BASELINE), str(slower)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "table6.cbn/train_iter_per_s/ratio_to:bn" in line)
    assert "10.0%" in row
    assert "train_step_flops" not in out  # deterministic figures have no spread to calibrate
    assert cli.main(["spread", str(BASELINE)]) == 2


def test_measuring_the_micro_suite_reads_the_file_it_ran(tmp_path, monkeypatch):
    ran = []

    def fake_run(suite, device, out, threads, mode):
        ran.append((suite, device, out, threads, mode))
        return pytest_suites.load(MICRO_BASELINE), MICRO_BASELINE

    monkeypatch.setattr(pytest_suites, "run", fake_run)
    (found,) = commands.measure(["micro"], "quick", "cpu", 2, tmp_path)
    assert ran == [("micro", "cpu", tmp_path, 2, Mode())]
    assert found.path == str(MICRO_BASELINE) and found.suites == ("micro",)


# ---------------------------------------------------------------------- devices
# The H100 files predate the A/A controls: on CUDA their rules find nothing there, and fail as MISSING
# (the micro-benchmarks' control has two rules, a floor and a ceiling).
CONTROL_CHECKS = [*(f"table6.bn_control/{what}_iter_per_s_interval_deviation/ratio_to:bn" for what in ("train", "inference")),
                  *["micro.*/bn-control/min_time/ratio_to:bn"] * 2]


def test_a_cuda_run_passes_against_itself_as_its_gpu_baseline_but_for_the_control_it_predates(capsys):
    code, out = run_gate(capsys, GPU_BASELINE, GPU_MICRO_BASELINE, baseline=(GPU_BASELINE, GPU_MICRO_BASELINE))
    assert code == 1, out
    assert "0 fail, 4 missing" in out and out.rstrip().endswith(f"checks: {', '.join(CONTROL_CHECKS)}")
    assert "table6.*.counted_total_bytes (line" in out and "on cpu" in out  # CPU-only rules: not checked here


def test_an_injected_regression_in_a_cuda_run_fails_with_the_metric_named(tmp_path, capsys):
    bigger = edited(tmp_path, GPU_BASELINE, lambda d: scale(d, "table6", "cbn", "peak_allocated_bytes", 1.1))
    code, out = run_gate(capsys, bigger, GPU_MICRO_BASELINE, baseline=(GPU_BASELINE, GPU_MICRO_BASELINE))
    assert code == 1
    assert "1 fail, 4 missing" in out and out.rstrip().endswith(f"checks: table6.cbn.peak_allocated_bytes, {', '.join(CONTROL_CHECKS)}")


def test_a_metric_its_device_produces_but_the_run_lacks_still_fails(tmp_path, capsys):
    lost = edited(tmp_path, BASELINE, lambda d: case(d, "table6", "bn_control")["metrics"].pop("counted_total_bytes"))
    code, out = run_gate(capsys, lost, MICRO_BASELINE)
    assert code == 1
    assert out.rstrip().endswith("table6.bn_control.counted_total_bytes")


def test_a_rule_for_another_device_is_not_checked(tmp_path, capsys):
    rules = tmp_path / "thresholds.toml"
    rules.write_text('[table6]\n"*.peak_allocated_bytes" = { cuda = "== baseline" }\n"*.train_step_flops" = "== baseline"\n')
    code, out = run_gate(capsys, BASELINE, rules=rules, baseline=(BASELINE,))
    assert code == 0, out
    assert "rules for metrics of other devices, not checked: table6.*.peak_allocated_bytes (line 2, on cuda)" in out


def test_paths_that_disagree_fail_the_gate_saying_so(tmp_path, capsys):
    def disagree(d):
        c = case(d, "gradpath", "naive-3x3-C64")
        c.update(status="error", error="naive and efficient paths disagree: max relative difference 2.00e-02")
        d["derived"] = [x for x in d["derived"] if "C64" not in x["id"]["subject"]]

    current = edited(tmp_path, BASELINE, disagree)
    code, out = run_gate(capsys, current, MICRO_BASELINE)
    assert code == 1 and "gradpath.naive-3x3-C64.stored_bytes_per_step" in out
    rules = thresholds.load(THRESHOLDS)
    found = verdicts.evaluate(rules, [sources.load_source(BASELINE)], [sources.load_source(current)])
    (missing,) = [v for v in found if v.metric == "gradpath.naive-3x3-C64.stored_bytes_per_step"]
    assert missing.status == "missing"
    assert missing.note == ("not in this run: case naive-3x3-C64 error: naive and efficient paths disagree: "
                            "max relative difference 2.00e-02")


def test_by_default_the_gate_measures_the_suites_its_rules_guard():
    rules = thresholds.load(THRESHOLDS)
    assert commands._suites([], rules) == ["table6", "gradpath", "classify", "micro"]  # not statistics: nothing timed
    assert commands._suites(["statistics"], rules) == ["statistics"]
    with pytest.raises(ValueError, match="unknown suite 'stats'; available: table6, gradpath, classify, statistics, quality, micro"):
        commands._suites(["stats"], rules)


# ---------------------------------------------------------------------- baseline --counts-only
def test_counts_only_takes_the_counts_and_keeps_the_timings(tmp_path):
    def new_code_on_another_machine(data):
        case(data, "table6", "cbn")["metrics"]["cbn_history_bytes"]["value"] += 4096
        derived(data, "table6", "cbn/memory/ratio_to:bn")["value"] += 0.001
        scale(data, "table6", "cbn", "train_step_time", 0.5)  # another CPU: other timings
        derived(data, "table6", "cbn/train_iter_per_s/ratio_to:bn")["value"] *= 2

    measured = edited(tmp_path, BASELINE, new_code_on_another_machine, "measured.json")
    baseline = tmp_path / "quick.json"
    baseline.write_bytes(BASELINE.read_bytes())
    commands._refresh_counts(baseline, measured)
    old, new, refreshed = (json.loads(p.read_text()) for p in (BASELINE, measured, baseline))
    metrics = case(refreshed, "table6", "cbn")["metrics"]
    assert metrics["cbn_history_bytes"] == case(new, "table6", "cbn")["metrics"]["cbn_history_bytes"]
    assert metrics["train_step_time"] == case(old, "table6", "cbn")["metrics"]["train_step_time"]
    assert derived(refreshed, "table6", "cbn/memory/ratio_to:bn") == derived(new, "table6", "cbn/memory/ratio_to:bn")
    assert derived(refreshed, "table6", "cbn/train_iter_per_s/ratio_to:bn") == derived(old, "table6", "cbn/train_iter_per_s/ratio_to:bn")
    assert refreshed["environment"] == old["environment"]
    assert "counts refreshed from measured.json" in case(refreshed, "table6", "cbn")["notes"]
    assert "counts refreshed from measured.json" in baseline.with_suffix(".md").read_text()


def test_counts_only_refreshes_the_micro_dispatch_counts_and_keeps_the_samples(tmp_path):
    def more_ops(data):
        bench = next(b for b in data["benchmarks"] if b["extra_info"]["norm"] == "cbn" and "aten_ops" in b["extra_info"])
        bench["extra_info"]["aten_ops"] += 12
        scale_micro(data, "forward+backward", "cbn", 3.0)

    measured = edited(tmp_path, MICRO_BASELINE, more_ops, "measured-micro.json")
    baseline = tmp_path / "micro.json"
    baseline.write_bytes(MICRO_BASELINE.read_bytes())
    commands._refresh_counts(baseline, measured)
    old, refreshed = json.loads(MICRO_BASELINE.read_text()), json.loads(baseline.read_text())

    def pick(data: dict) -> dict:
        return next(b for b in data["benchmarks"] if b["group"] == "forward+backward" and b["extra_info"]["norm"] == "cbn")

    assert pick(refreshed)["extra_info"]["aten_ops"] == pick(old)["extra_info"]["aten_ops"] + 12
    assert pick(refreshed)["stats"] == pick(old)["stats"]
    assert refreshed["machine_info"]["cbn_bench"]["counts_from"] == "measured-micro.json"
    pytest_suites.load(baseline)  # still a micro file this version reads


def test_counts_only_refuses_a_measurement_of_other_cases(tmp_path):
    measured = edited(tmp_path, BASELINE, lambda data: data["cases"].pop(), "fewer.json")
    baseline = tmp_path / "quick.json"
    baseline.write_bytes(BASELINE.read_bytes())
    with pytest.raises(sources.GateError, match="other cases .* re-measure the whole baseline"):
        commands._refresh_counts(baseline, measured)
    assert baseline.read_bytes() == BASELINE.read_bytes()
