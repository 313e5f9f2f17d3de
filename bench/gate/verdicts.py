"""The gate's verdicts, one per rule and metric: a run's metrics (bench/gate/sources.py) against a
stored baseline under a thresholds file's rules (bench/gate/thresholds.py), and the gate's table.

Timing enters only as ratios measured within one run, never as seconds from another machine. A
timing rule that fails may be re-measured once before it counts; a deterministic rule's first
verdict is final.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from bench import report
from bench.gate.sources import GatedValue, GateError, Source
from bench.gate.thresholds import Rule
from bench.suite import Table

STATUSES = ("pass", "fail", "missing", "new")  # missing and fail fail the gate


@dataclass(frozen=True)
class Verdict:
    metric: str
    rule: Rule
    status: str  # one of STATUSES
    baseline: float | None = None
    current: float | None = None
    timing: bool = False
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "missing")


def _merge(sources: list[Source]) -> tuple[dict[str, GatedValue], dict[str, str]]:
    metrics, absent = {}, {}
    for source in sources:
        metrics.update(source.metrics)
        absent.update(source.absent)
    return metrics, absent


def evaluate(rules: list[Rule], baselines: list[Source], currents: list[Source]) -> list[Verdict]:
    """One verdict per (rule, metric) for the suites the current sources hold."""
    base, _ = _merge(baselines)
    now, absent = _merge(currents)
    names = sorted(set(base) | set(now))
    _check_one_rule_per_metric(rules, names)
    devices = {s: source.device for source in currents for s in source.suites}
    verdicts = []
    for rule in rules:
        if rule.suite not in devices or not rule.applies_on(devices[rule.suite]):
            continue  # listed in the table's caption as not checked
        matched = [n for n in names if rule.matches(n)]
        if not matched:
            verdicts.append(Verdict(rule.pattern, rule, "missing", note="no metric of this name in the baseline or this run"))
        verdicts += [judge(rule, name, base.get(name), now.get(name), absent) for name in matched]
    return verdicts


def judge(rule: Rule, name: str, base: GatedValue | None, now: GatedValue | None, absent: dict[str, str]) -> Verdict:
    known = now or base
    timing = known is not None and known.timing
    b = None if base is None else base.value
    if now is None:
        return Verdict(name, rule, "missing", b, None, timing, note=_why_absent(name, absent))
    if rule.needs_baseline and base is None:
        return Verdict(name, rule, "new", None, now.value, timing, note="not in the baseline: refresh it to gate this")
    return Verdict(name, rule, "pass" if rule.holds(now.value, b) else "fail", b, now.value, timing)


def _why_absent(name: str, absent: dict[str, str]) -> str:
    suite, case = (name.split(".") + [""])[:2]
    if f"{suite}.{case}" in absent:
        return f"not in this run: case {case} {absent[f'{suite}.{case}']}"
    failed = [f"{key.split('.', 1)[1]} ({why})" for key, why in absent.items() if key.startswith(f"{suite}.")]
    return "not in this run" + (f"; cases without figures: {', '.join(failed)}" if failed else "")


def _check_one_rule_per_metric(rules: list[Rule], names: list[str]) -> None:
    entries = list({r.pattern: r for r in rules}.values())  # a list of rules for one key is one entry
    for name in names:
        matching = [r for r in entries if r.matches(name)]
        if len(matching) > 1:
            lines = " and ".join(f"line {r.line} ({r.pattern!r})" for r in matching)
            raise GateError(f"thresholds: {name!r} is matched by {lines}; one rule per metric, narrow a pattern")


def needs_remeasure(verdicts: list[Verdict]) -> set[str]:
    """The suites holding a failed timing rule."""
    return {v.rule.suite for v in verdicts if v.status == "fail" and v.timing}


def remeasured(verdicts: list[Verdict], fresh: list[Source]) -> list[Verdict]:
    """Failed timing verdicts judged again on a fresh measurement; the rest stand."""
    now, absent = _merge(fresh)
    out = []
    for v in verdicts:
        if v.status == "fail" and v.timing:
            base = None if v.baseline is None else GatedValue(v.baseline, True)
            again = judge(v.rule, v.metric, base, now.get(v.metric), absent)
            first = f"re-measured once: first {report.fmt(v.current, 4)} failed"
            v = replace(again, note="; ".join(filter(None, [first, again.note])))
        out.append(v)
    return out


def not_remeasured(verdicts: list[Verdict], why: str) -> list[Verdict]:
    return [replace(v, note=f"timing; not re-measured ({why})") if v.status == "fail" and v.timing else v
            for v in verdicts]


def exit_status(verdicts: list[Verdict]) -> int:
    return 1 if any(v.failed for v in verdicts) else 0


_STYLE = {"pass": "[green]pass[/green]", "fail": "[bold red]FAIL[/bold red]", "missing": "[bold red]MISSING[/bold red]",
          "new": "[yellow]new[/yellow]"}


def table(verdicts: list[Verdict], rules: list[Rule], currents: list[Source], notes: list[str]) -> Table:
    rows = [[v.metric, _fmt(v.baseline), _fmt(v.current), f"{v.rule.text}  (line {v.rule.line})", _STYLE[v.status], v.note]
            for v in verdicts]
    counts = ", ".join(f"{sum(v.status == s for v in verdicts)} {s}" for s in STATUSES)
    devices = {s: c.device for c in currents for s in c.suites}
    idle = sorted({r.suite for r in rules} - set(devices))
    elsewhere = sorted({f"{r.pattern} (line {r.line}, on {', '.join(r.devices)})" for r in rules
                        if r.suite in devices and not r.applies_on(devices[r.suite])})
    caption = [f"{len(verdicts)} checks: {counts}",
               "timing metrics are ratios within one run; a failed timing rule is re-measured once before it counts",
               *notes]
    if idle:
        caption.append(f"rules for suites not in this run, not checked: {', '.join(idle)}")
    if elsewhere:
        caption.append(f"rules for metrics of other devices, not checked: {'; '.join(elsewhere)}")
    title = "Regression gate: " + ", ".join(f"{c.path} ({c.profile})" for c in currents)
    return Table(title, ["metric", "baseline", "current", "rule", "verdict", "note"], rows, caption,
                 justify=["left", "right", "right", "left", "left", "left"])


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isfinite(value) and value == int(value) and abs(value) >= 1000:
        return f"{value:,.0f}"  # counts in full: an exact rule's difference must be visible
    return report.fmt(value, 4)


def spread_table(sources: list[Source]) -> Table:
    """How each timing metric moved over repeated identical runs (A/A): what tolerances rest on.

    The widest pairwise drift, max/min - 1, is what a ">= baseline - X%" rule meets when the baseline
    happened to be the best run and the gate's run the worst.
    """
    names = sorted(set.intersection(*(set(s.metrics) for s in sources)))
    rows = []
    for name in names:
        values = [s.metrics[name].value for s in sources]
        if not sources[0].metrics[name].timing:
            continue
        low, high, middle = min(values), max(values), statistics.median(values)
        drift = f"{100 * (high / low - 1):.1f}%" if low > 0 else "-"
        rows.append([name, report.fmt(low, 4), report.fmt(middle, 4), report.fmt(high, 4), drift])
    caption = [f"{len(sources)} runs: " + ", ".join(s.path for s in sources)]
    return Table("Spread of timing metrics over repeated identical runs", ["metric", "min", "median", "max", "max/min - 1"],
                 rows, caption)
