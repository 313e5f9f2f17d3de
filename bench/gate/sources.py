"""What the gate compares: named metrics drawn from a cbn-bench results file or a micro-benchmark
(pytest-benchmark) file, with the device class, profile and schema that decide comparability.

Metric names are ``<suite>.<case>.<metric>`` for a case's figure (``table6.cbn.train_step_flops``)
and ``<suite>.<figure id's key>`` for a derived one (``table6.cbn/train_iter_per_s/ratio_to:bn``,
bench.results.FigureId): never a figure's label, which may change freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bench import pytest_suites, results
from bench.results import ResultsFileError, RunResult
from bench.training_modes import Mode


class GateError(ValueError):
    """A comparison the gate refuses to make (usage problem: exit status 2)."""


@dataclass(frozen=True)
class GatedValue:
    """One value the gate compares (a case's metric or a derived figure), reduced to what a rule needs."""

    value: float
    timing: bool  # from timing samples: noisy, so a failure may be re-measured once


@dataclass(frozen=True)
class Source:
    """One results file (a harness run or a pytest-benchmark run), reduced to what the gate compares."""

    path: str
    schema: str  # name and version, e.g. "cbn-bench/results v4"
    device: str  # "cpu" or "cuda": which rules apply (bench/gate/thresholds.py)
    device_class: str
    profile: str
    suites: tuple[str, ...]
    metrics: dict[str, GatedValue]
    absent: dict[str, str] = field(default_factory=dict)  # "<suite>.<case>" -> why it has no figures
    cpu_model: str = ""
    threads: int | None = None
    settings: dict[str, list[str]] = field(default_factory=dict)  # suite -> its cases' stored settings
    mode: Mode = Mode()  # the training mode its cases ran in (bench/training_modes.py)
    world_size: int = 1  # processes per case (bench/ranks.py)

    @property
    def kind(self) -> str:
        return self.schema.split(" ")[0]


def device_class(device: str, device_name: str) -> str:
    """What a baseline is kept per: "cpu" for any CPU (ratios only), else the GPU model."""
    return "cpu" if device == "cpu" else results.slug(device_name)


def from_run(run: RunResult, path: str, stored_version: int) -> Source:
    metrics: dict[str, GatedValue] = {}
    absent = {}
    for case in run.cases:
        if case.status != "ok":
            why = (case.error or "; ".join(case.notes) or "").strip().splitlines()
            absent[f"{case.suite}.{case.case}"] = f"{case.status}: {why[0][:120] if why else ''}".rstrip(": ")
            continue
        for name, metric in case.metrics.items():
            metrics[f"{case.suite}.{case.case}.{name}"] = GatedValue(metric.value, metric.timing)
    for d in run.derived:
        metrics[str(d.id)] = GatedValue(d.value, d.timing)
    settings: dict[str, set[str]] = {}
    for case in run.cases:
        settings.setdefault(case.suite, set()).add(json.dumps(case.settings, sort_keys=True))
    e = run.environment
    return Source(path, f"{run.schema} v{stored_version}", "cpu" if run.device == "cpu" else "cuda",
                  device_class(run.device, e.device_name), run.profile, tuple(run.suites), metrics, absent,
                  e.cpu_model, e.threads, {suite: sorted(texts) for suite, texts in settings.items()}, _mode(run, path),
                  max((case.processes.world_size for case in run.cases), default=1))


def _mode(run: RunResult, path: str) -> Mode:
    found = {case.mode for case in run.cases if case.mode is not None}  # the cases of suites that take a mode
    if len(found) > 1:
        raise GateError(f"{path} holds cases of several training modes ({', '.join(sorted(m.label for m in found))}); "
                        "the gate compares one mode at a time")
    return found.pop() if found else Mode()


def load_source(path: str | Path) -> Source:
    """A cbn-bench results file or a pytest-benchmark JSON, told apart by their content."""
    data = results.read_json(Path(path), "results file")
    if results.is_results_file(data):
        run, stored = results.parse(data, str(path))
        return from_run(run, str(path), stored)
    try:
        run = pytest_suites.from_json(data, str(path))
    except ResultsFileError:
        raise ResultsFileError(f"{path}: neither a cbn-bench results file nor a micro-benchmark file") from None
    return from_run(run, str(path), run.schema_version)


def baseline_path(folder: Path, source_kind: str, device_cls: str, profile: str, mode: Mode = Mode()) -> Path:
    """<folder>/<device class>/<profile>.json (micro.json for the micro-benchmarks), with the mode's
    suffix (e.g. quick-bf16-eager.json) for any mode but the default fp32 eager."""
    name = "micro" if source_kind == pytest_suites.SCHEMA else profile
    return folder / device_cls / f"{name}{mode.slug}.json"


def pair(baselines: list[Source], currents: list[Source]) -> list[str]:
    """Check each current source against the baseline of its kind; notes on lesser differences."""
    by_kind = {b.kind: b for b in baselines}
    if len(by_kind) < len(baselines):
        raise GateError("two baselines of one kind given: pass one results file and at most one micro-benchmark file")
    seen: dict[str, str] = {}
    notes = []
    for current in currents:
        for suite in current.suites:
            if suite in seen:
                raise GateError(f"suite {suite!r} is in both {seen[suite]} and {current.path}: give one results file per suite")
            seen[suite] = current.path
        baseline = by_kind.get(current.kind)
        if baseline is None:
            raise GateError(f"no baseline given for {current.path} ({current.kind}); pass one with --baseline")
        notes += check_comparable(baseline, current)
    return notes


def check_comparable(baseline: Source, current: Source) -> list[str]:
    """Refuse unlike comparisons (device class, profile, schema, mode, processes per case); note CPU
    model or thread changes."""
    if baseline.world_size != current.world_size:
        raise GateError(f"refusing to compare: the baseline {baseline.path} ran {baseline.world_size} process(es) per case, "
                        f"the current {current.path} {current.world_size}; compare runs with the same --nproc")
    if baseline.mode != current.mode:
        raise GateError(f"refusing to compare: the baseline {baseline.path} ran in mode {baseline.mode.label}, the current "
                        f"{current.path} in {current.mode.label}; compare with a baseline of that mode "
                        f"(python -m bench baseline{current.mode.flags} makes one)")
    for what, old, new in (("device class", baseline.device_class, current.device_class),
                           ("profile", baseline.profile, current.profile), ("schema", baseline.schema, current.schema)):
        if old != new:
            fix = ("re-measure the older one (python -m bench baseline refreshes a baseline)" if what == "schema" else
                   f"compare with a baseline of {what} {new!r} (python -m bench baseline makes one), or rerun at {old!r}")
            raise GateError(f"refusing to compare: the baseline {baseline.path} is {what} {old!r}, the current "
                            f"{current.path} is {new!r}; {fix}")
    for suite in sorted(set(baseline.settings) & set(current.settings)):
        if baseline.settings[suite] != current.settings[suite]:
            raise GateError(f"refusing to compare: {suite} in the baseline {baseline.path} was measured with other "
                            f"settings than in {current.path} (same profile name {current.profile!r}, changed "
                            "definition); re-measure the baseline (python -m bench baseline)")
    notes = []
    if baseline.cpu_model != current.cpu_model:
        notes.append(f"CPU differs from the baseline's ({baseline.cpu_model!r} vs {current.cpu_model!r}): "
                     "timing ratios may shift")
    if baseline.threads != current.threads:
        notes.append(f"{current.path}: {current.threads} threads, the baseline {baseline.threads}")
    return notes
