"""The thresholds file: the rule grammar, what each rule accepts, and errors that name the line."""

from pathlib import Path

import pytest

from bench.gate import thresholds
from bench.gate.thresholds import ThresholdsError
from suites import ratios
from suites.constants import CLASSIFY_STEP_TIME_OVER_FLOPS_TARGET, CONTROL, CONTROL_MARGIN, STEP_TIME_OVER_FLOPS_TARGET

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "thresholds.toml"


def write(tmp_path, text: str):
    path = tmp_path / "thresholds.toml"
    path.write_text(text)
    return path


def rule(text: str) -> thresholds.Rule:
    return thresholds.parse_rule("suite.metric", text, 1, "t.toml")


@pytest.mark.parametrize("text, baseline, holds, fails", [
    ("== baseline", 100.0, [100.0], [100.0001, 99.9999]),
    ("== baseline ± 1%", 100.0, [99.0, 101.0], [98.9, 101.1]),
    ("== baseline +- 0.5", 10.0, [9.5, 10.5], [9.4, 10.6]),
    (">= baseline - 8%", 0.8, [0.736, 0.9], [0.735]),
    ("<= baseline + 10%", 2.0, [2.2, 1.0], [2.21]),
    (">= baseline", 5.0, [5.0, 6.0], [4.99]),
    (">= 50", None, [50.0, 400.0], [49.9]),
    ("<= 1e-3", None, [0.0, 1e-3], [1.1e-3]),
])
def test_each_rule_accepts_and_rejects_what_it_says(text, baseline, holds, fails):
    r = rule(text)
    assert r.needs_baseline == (baseline is not None)
    assert all(r.holds(v, baseline) for v in holds)
    assert not any(r.holds(v, baseline) for v in fails)


def test_nan_never_holds():
    assert not rule(">= 0").holds(float("nan"), None)


def test_a_file_gives_suite_qualified_patterns_with_their_lines(tmp_path):
    path = write(tmp_path, "\n".join([
        "# rules",
        "[table6]",
        '"*.train_step_flops" = "== baseline"',
        'cbn.forward_macs = "== baseline ± 0.1%"   # an unquoted dotted key',
        "",
        "[gradpath]",
        '"speedup 3x3 C=256" = [">= 50", ">= baseline - 40%"]',
    ]))
    rules = thresholds.load(path)
    assert [(r.pattern, r.line) for r in rules] == [
        ("table6.*.train_step_flops", 3), ("table6.cbn.forward_macs", 4),
        ("gradpath.speedup 3x3 C=256", 7), ("gradpath.speedup 3x3 C=256", 7)]
    assert rules[0].matches("table6.cbn.train_step_flops")
    assert not rules[0].matches("table6.cbn.train_step_flops_ratio")
    assert rules[0].suite == "table6"


@pytest.mark.parametrize("lines, message", [
    (["[table6]", '"a" = "== baseline"', '"b" = ">= baseline -"'], "thresholds.toml:3: rule '>= baseline -' for 'table6.b'"),
    (["[table6]", '"a" = "about the same"'], "thresholds.toml:2: rule 'about the same'"),
    (["[table6]", '"a" = ">= baseline ± 5%"'], "thresholds.toml:2: '±' goes with '=='"),
    (["[table6]", '"a" = "== baseline - 5%"'], "thresholds.toml:2: '== baseline - ...' is one number"),
    (["[table6]", "", '"a" = 3'], "thresholds.toml:3: the rule for 'a' must be a string"),
    (['stray = "== baseline"'], "thresholds.toml:1: 'stray' is not a [suite] table"),
    (["[table6]", '"a" = "== baseline', ""], "not valid TOML"),
])
def test_malformed_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(ThresholdsError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        thresholds.load(write(tmp_path, "\n".join(lines)))


def test_toml_syntax_errors_carry_the_parsers_line(tmp_path):
    with pytest.raises(ThresholdsError, match=r"line 2"):
        thresholds.load(write(tmp_path, '[table6]\n"a" == "x"\n'))


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ThresholdsError, match="no such thresholds file"):
        thresholds.load(tmp_path / "absent.toml")


def test_the_committed_thresholds_file_parses():
    rules = thresholds.load(COMMITTED)
    assert {r.suite for r in rules} == {"table6", "gradpath", "classify", "micro"}
    assert all(r.line > 0 for r in rules)


def test_rules_per_device_apply_only_there(tmp_path):
    rules = thresholds.load(write(tmp_path, "\n".join([
        "[table6]",
        '"*.counted_total_bytes" = { cpu = "== baseline" }',
        '"ratio" = { cpu = "<= 1.10", cuda = ["<= 1.05", ">= 0.5"] }',
        '"*.train_step_flops" = "== baseline"',
    ])))
    assert [(r.pattern, r.text, r.devices, r.line) for r in rules] == [
        ("table6.*.counted_total_bytes", "== baseline", ("cpu",), 2),
        ("table6.ratio", "<= 1.10", ("cpu",), 3), ("table6.ratio", "<= 1.05", ("cuda",), 3),
        ("table6.ratio", ">= 0.5", ("cuda",), 3), ("table6.*.train_step_flops", "== baseline", (), 4)]
    assert rules[0].applies_on("cpu") and not rules[0].applies_on("cuda")
    assert rules[-1].applies_on("cpu") and rules[-1].applies_on("cuda")


def test_a_per_device_table_with_an_unknown_device_reads_as_a_dotted_name(tmp_path):
    # { tpu = ... } is not a device table: it is the metric "x.tpu", and its rule must be a string
    rules = thresholds.load(write(tmp_path, '[table6]\n"x" = { tpu = "== baseline" }\n'))
    assert [(r.pattern, r.devices) for r in rules] == [("table6.x.tpu", ())]


def test_the_gate_enforces_the_step_time_target_that_table6_prints():
    rules = [r for r in thresholds.load(COMMITTED) if r.pattern == str(ratios.step_time_over_flops_id("table6", "cbn"))]
    assert {r.devices: (r.op, r.absolute) for r in rules} == {
        (device,): ("<=", target) for device, target in STEP_TIME_OVER_FLOPS_TARGET.items()}


def test_classify_holds_its_step_time_ratio_to_the_baseline_while_its_target_is_a_goal():
    check = ratios.step_time_over_flops_id("classify", "resnet18/cbn")
    rules = [r for r in thresholds.load(COMMITTED) if r.pattern == str(check)]
    assert [(r.op, r.absolute, r.devices) for r in rules] == [("<=", None, ())]
    assert CLASSIFY_STEP_TIME_OVER_FLOPS_TARGET["cpu"] == 1.08


@pytest.mark.parametrize("suite, subject", [("table6", CONTROL), ("classify", f"resnet18/{CONTROL}")])
def test_the_gate_holds_every_a_a_control_to_the_margin_the_tables_print(suite, subject):
    for quantity, _ in ratios.TIMED.values():
        figure = ratios.deviation_id(suite, subject, quantity)
        rules = [r for r in thresholds.load(COMMITTED) if r.pattern == str(figure)]
        assert rules, figure
        assert {r.devices: (r.op, r.absolute) for r in rules} == {
            (device,): ("<=", margin) for device, margin in CONTROL_MARGIN.items()}
