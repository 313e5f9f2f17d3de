"""The thresholds file: the rule grammar, what each rule accepts, and errors that name the line."""

from pathlib import Path

import pytest

from bench import thresholds
from bench.thresholds import ThresholdsError


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
    rules = thresholds.load(Path(__file__).resolve().parents[1] / "results" / "thresholds.toml")
    assert {r.suite for r in rules} == {"table6", "gradpath", "micro"}
    assert all(r.line > 0 for r in rules)
