"""`python -m bench baseline --counts-only`: a baseline's exact counts taken from a new measurement,
its timings and peaks kept.

Counts (FLOPs, counted bytes, dispatched ops, their ratios) follow the code and repeat on every
machine with the same torch build (so do, closely, the numerical differences a suite records as
counts); timing ratios follow the machine. A change that adds ops to a
layer must update the first without re-measuring the second on whatever CPU is at hand: the gate's
timing rules were calibrated on the baseline's machine, and a baseline re-timed on another CPU
model can fail CI's machine by that difference alone. The refreshed file says what it took from
where: in each refreshed case's notes (results files) or in machine_info.cbn_bench (micro files).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench import pytest_suites, results
from bench.gate.sources import GateError
from bench.results import RunResult

COUNTS_NOTE = "counts refreshed from"  # starts the note a refreshed case carries


def refresh_counts(baseline: Path, measured: Path) -> tuple[str, list[str]]:
    """The baseline file's new text, with every count-kind figure taken from measured, and one line
    per figure that changed ("name: old -> new")."""
    if not baseline.exists():
        raise GateError(f"--counts-only: no baseline {baseline} to refresh; run `python -m bench baseline` without it")
    data = results.read_json(baseline, "baseline")
    if results.is_results_file(data):
        return _refresh_run(results.load(baseline), results.load(measured), measured)
    return _refresh_micro(data, results.read_json(measured, "micro-benchmark file"), measured, baseline)


def _refresh_run(old: RunResult, new: RunResult, source: Path) -> tuple[str, list[str]]:
    _check_same_cases(old, new, source)
    fresh = {(c.suite, c.case): c for c in new.cases}
    changes: list[str] = []
    cases = []
    for case in old.cases:
        update = fresh[(case.suite, case.case)]
        metrics = dict(case.metrics)
        for name, metric in update.metrics.items():
            if metric.kind == "count":
                if name in metrics and metrics[name].value != metric.value:
                    changes.append(f"{case.suite}.{case.case}.{name}: {metrics[name].value:g} -> {metric.value:g}")
                metrics[name] = metric
        notes = [n for n in case.notes if not n.startswith(COUNTS_NOTE)] + [f"{COUNTS_NOTE} {source.name}"]
        cases.append(dataclasses.replace(case, metrics=metrics, notes=notes))
    derived_new = {d.id: d for d in new.derived if d.kind == "count"}
    derived = []
    for figure in old.derived:
        fresh_figure = derived_new.get(figure.id)
        if fresh_figure is not None and figure.kind == "count":
            if fresh_figure.value != figure.value:
                changes.append(f"{figure.id}: {figure.value:g} -> {fresh_figure.value:g}")
            figure = fresh_figure
        derived.append(figure)
    return results.to_json(dataclasses.replace(old, cases=cases, derived=derived)), changes


def _check_same_cases(old: RunResult, new: RunResult, source: Path) -> None:
    mine = {(c.suite, c.case) for c in old.cases}
    theirs = {(c.suite, c.case) for c in new.cases}
    if mine != theirs or old.profile != new.profile or old.device != new.device:
        missing = sorted(f"{s}.{c}" for s, c in mine ^ theirs)
        raise GateError(f"--counts-only: {source} measured other cases or another profile or device than the baseline "
                        f"({', '.join(missing) or f'{new.profile} on {new.device}'}); re-measure the whole baseline instead")


def _refresh_micro(old: dict, new: dict, source: Path, baseline: Path) -> tuple[str, list[str]]:
    pytest_suites.from_json(old, str(baseline))  # both must be micro files this version reads
    pytest_suites.from_json(new, str(source))
    fresh = {b["fullname"]: b["extra_info"] for b in new["benchmarks"]}
    if set(fresh) != {b["fullname"] for b in old["benchmarks"]}:
        raise GateError(f"--counts-only: {source} holds other micro-benchmarks than {baseline}; "
                        "re-measure the whole baseline instead")
    changes = []
    for bench in old["benchmarks"]:
        for name in pytest_suites.COUNTED:
            if name in fresh[bench["fullname"]]:
                value = fresh[bench["fullname"]][name]
                if bench["extra_info"].get(name) != value:
                    changes.append(f"micro.{bench['group']}/{bench['extra_info']['norm']}.{name}: "
                                   f"{bench['extra_info'].get(name)} -> {value}")
                bench["extra_info"][name] = value
    old["machine_info"]["cbn_bench"]["counts_from"] = source.name
    return json.dumps(old, indent=4), changes
