"""Regression rules for the gate, read from a TOML file: one rule per metric (or glob of metrics).

    [table6]                                   # the suite; keys are the rest of the metric name
    "*.train_step_flops" = "== baseline"       # deterministic: must not move at all
    "cbn/train_iter_per_s/ratio_to:bn" = ">= baseline - 8%"   # a derived figure, by its id
    [gradpath]
    "naive-3x3-C256/stat_grad_time/ratio_to:efficient" = ">= 50"   # an absolute floor, no baseline needed

A metric's entry is one rule or a list of rules that must all hold (``[">= 50", ">= baseline - 40%"]``),
or an inline table of such rules per device, for metrics that exist on some devices only or are
held to different bounds: ``{ cpu = "== baseline" }``, ``{ cpu = "<= 1.10", cuda = "<= 1.05" }``
(devices: ``cpu``, ``cuda``). A plain entry applies on every device; where a rule applies, a metric
it matches in neither the baseline nor the run is MISSING, and fails.
A rule is ``OP REFERENCE``: OP is ``==``, ``>=`` or ``<=``; REFERENCE is a number, ``baseline``, or
``baseline +/- AMOUNT`` where AMOUNT is a number or a percentage of the baseline value. ``== baseline
± 1%`` (or ``+-``) allows 1% either way. Every error names the file and line.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NUMBER = r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"
_RULE = re.compile(
    rf"^(?P<op>==|>=|<=)\s*(?:(?P<absolute>-?{_NUMBER})"
    rf"|baseline(?:\s*(?P<sign>\+-|±|\+|-)\s*(?P<amount>{_NUMBER})(?P<percent>%)?)?)$"
)


class ThresholdsError(ValueError):
    """A thresholds file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Rule:
    pattern: str  # "suite.rest of the metric name", may hold * and ? globs
    text: str  # as written, e.g. ">= baseline - 8%"
    op: str  # "==", ">=" or "<="
    line: int
    devices: tuple[str, ...] = ()  # where the metric exists; empty: everywhere
    absolute: float | None = None  # compare with this number; otherwise with the baseline value
    sign: str = ""  # "", "+", "-" or "±" before the amount
    amount: float = 0.0
    percent: bool = False

    @property
    def suite(self) -> str:
        return self.pattern.split(".", 1)[0]

    @property
    def needs_baseline(self) -> bool:
        return self.absolute is None

    def matches(self, metric: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.pattern)

    def applies_on(self, device: str) -> bool:
        return not self.devices or device in self.devices

    def limit(self, baseline: float | None) -> float:
        """The number the current value is compared with (for ±, the allowed distance)."""
        if self.absolute is not None:
            return self.absolute
        assert baseline is not None
        amount = self.amount * abs(baseline) / 100 if self.percent else self.amount
        return {"": baseline, "+": baseline + amount, "-": baseline - amount, "±": amount}[self.sign]

    def holds(self, current: float, baseline: float | None) -> bool:
        if math.isnan(current):
            return False
        limit = self.limit(baseline)
        if self.sign == "±":
            return baseline is not None and abs(current - baseline) <= limit
        return {"==": current == limit, ">=": current >= limit, "<=": current <= limit}[self.op]


def parse_rule(pattern: str, text: str, line: int, where: str, devices: tuple[str, ...] = ()) -> Rule:
    found = _RULE.match(" ".join(text.split()))
    if found is None:
        raise ThresholdsError(
            f"{where}:{line}: rule {text!r} for {pattern!r} is not OP REFERENCE; write e.g. \"== baseline\", "
            "\">= baseline - 8%\", \"== baseline ± 0.5%\" or \">= 50\""
        )
    op, sign = found["op"], {"+-": "±"}.get(found["sign"] or "", found["sign"] or "")
    if sign == "±" and op != "==":
        raise ThresholdsError(f"{where}:{line}: '±' goes with '==' (a band around the baseline), not {op!r}")
    if sign in ("+", "-") and op == "==":
        raise ThresholdsError(f"{where}:{line}: '== baseline {sign} ...' is one number; use '>=', '<=' or '± ...'")
    return Rule(pattern, text, op, line, devices, absolute=None if found["absolute"] is None else float(found["absolute"]),
                sign=sign, amount=float(found["amount"] or 0), percent=bool(found["percent"]))


def load(path: str | Path) -> list[Rule]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ThresholdsError(f"{path}: no such thresholds file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line N, column M)"
        raise ThresholdsError(f"{path}: not valid TOML: {err}") from None
    lines = text.splitlines()
    rules: list[Rule] = []
    for suite, table in data.items():
        if not isinstance(table, dict):
            line = next((n for n, raw in enumerate(lines, 1) if _key_part(raw.strip()).strip("\"'") == suite), 0)
            raise ThresholdsError(f"{path}:{line}: {suite!r} is not a [suite] table of rules; put rules under [{suite}]")
        for key, value in _flatten(table):
            line = _line_of(lines, suite, key)
            per_device = value.items() if _is_per_device(value) else [(None, value)]
            for device, entry in per_device:
                texts = entry if isinstance(entry, list) else [entry]
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise ThresholdsError(f"{path}:{line}: the rule for {key!r} must be a string such as \"== baseline\", "
                                          "a list of them (all must hold), or a table of those per device: "
                                          "{ cpu = \"== baseline\" }")
                devices = () if device is None else (device,)
                rules += [parse_rule(f"{suite}.{key}", text, line, str(path), devices) for text in texts]
    return rules


DEVICES = ("cpu", "cuda")


def _is_per_device(value: object) -> bool:
    """{ cpu = ..., cuda = ... }: rules per device (a table of other keys is a dotted metric name)."""
    return isinstance(value, dict) and bool(value) and set(value) <= set(DEVICES)


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Unquoted dotted keys (cbn.train_step_flops = ...) come back as nested tables: join them again."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        nested = isinstance(value, dict) and not _is_per_device(value)
        out += _flatten(value, name + ".") if nested else [(name, value)]
    return out


def _line_of(lines: list[str], table: str, key: str) -> int:
    """The 1-based line defining key under [table] (tomllib keeps no positions); 0 if not found."""
    start = next((n for n, line in enumerate(lines) if line.split("#", 1)[0].strip() == f"[{table}]"), None)
    if start is None:
        return 0
    for number, line in enumerate(lines[start + 1:], start + 2):
        if _key_part(line.strip()).replace('"', "").replace("'", "") == key:
            return number
    return 0


def _key_part(line: str) -> str:
    """What stands left of '=' in a TOML key/value line ('=' may occur inside a quoted key)."""
    if line[:1] in ("\"", "'"):
        close = line.find(line[0], 1)
        return line[: close + 1] if close > 0 else line
    return line.split("=", 1)[0].strip()
