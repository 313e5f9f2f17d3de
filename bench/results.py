"""Typed results and their JSON storage: one file per run, schema-versioned, written atomically.

Each metric says its kind and unit (bench/metrics.py); values are stored unrounded, and a timing
keeps its raw samples beside its summary, so any statistic can be redone. Each case's params hold
the settings it was measured with, so a file renders and compares without today's code. Older
schema versions are upgraded on load, step by step (UPGRADES).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.files import write_new
from bench.metrics import Metric

SCHEMA = "cbn-bench/results"
SCHEMA_VERSION = 6
STATUSES = ("ok", "error", "skipped", "interrupted")


class ResultsFileError(ValueError):
    """A results file that is malformed, foreign, or from an unknown schema version."""


@dataclass(frozen=True)
class Environment:
    device_name: str
    device_count: int
    driver_version: str | None
    cuda_version: str | None
    cudnn_version: int | None
    torch_version: str
    torchvision_version: str | None
    cudnn_benchmark: bool
    tf32_matmul: bool
    tf32_cudnn: bool
    threads: int
    cpu_model: str
    python_version: str
    platform: str
    git_commit: str | None
    git_dirty: bool | None
    date_utc: str
    command: str
    optional_tools: dict[str, str] = field(default_factory=dict)  # tool -> version, or why it is missing
    cbn_source: str | None = None  # digest of the cbn package's source (bench/env.py); None in older files


@dataclass(frozen=True)
class CaseResult:
    suite: str
    case: str
    params: dict[str, Any]
    status: str  # one of STATUSES
    error: str | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # how samples were taken (bench/sampling.py)
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be measured
    work: dict[str, str] = field(default_factory=dict)  # what the case computed on, as digests (bench/suite.py)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"case status {self.status!r}: choose one of {', '.join(STATUSES)}")


@dataclass(frozen=True)
class Derived:
    """A figure computed from several cases of one run, e.g. a CBN/BN ratio with its interval."""

    suite: str
    name: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    note: str = ""
    kind: str = "count"  # "timing" when computed from timing samples (so noisy), else "count" or "peak"

    @property
    def timing(self) -> bool:
        return self.kind == "timing"


@dataclass(frozen=True)
class RunResult:
    profile: str
    device: str
    suites: list[str]
    environment: Environment
    cases: list[CaseResult]
    derived: list[Derived] = field(default_factory=list)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def cases_of(self, suite: str) -> list[CaseResult]:
        return [c for c in self.cases if c.suite == suite]

    def derived_of(self, suite: str) -> dict[str, Derived]:
        return {d.name: d for d in self.derived if d.suite == suite}


# ---------------------------------------------------------------------- storage
def to_json(run: RunResult) -> str:
    data = dataclasses.asdict(run)
    data["cases"] = [case_to_json(c) for c in run.cases]
    return json.dumps(data, indent=1, allow_nan=True)


def case_to_json(case: CaseResult) -> dict:
    data = dataclasses.asdict(case)
    data["metrics"] = {name: metric.to_json() for name, metric in case.metrics.items()}
    return data


def case_from_json(data: dict) -> CaseResult:
    metrics = {name: Metric.from_json(m) for name, m in data.get("metrics", {}).items()}
    return CaseResult(**{**data, "metrics": metrics})


def save_new(run: RunResult, folder: Path, stem: str) -> Path:
    """Store run as folder/stem.json, or stem-2.json etc.: an earlier run is never overwritten."""
    return write_new(folder, stem, ".json", to_json(run))


def stamp() -> str:
    """The UTC time that starts every stored file's name."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


# ---------------------------------------------------------------------- loading
def _upgrade_0_to_1(data: dict) -> dict:
    # Version 0 (pre-release) called the derived figures "ratios" and had no case notes.
    data = dict(data, schema_version=1)
    data["derived"] = data.pop("ratios", [])
    for case in data.get("cases", []):
        case.setdefault("notes", [])
    return data


def _upgrade_1_to_2(data: dict) -> dict:
    # Version 1 had no timing flag on derived figures; its timing figures were the ratios with an
    # interval, the log-log time slopes and CBN's step-time over FLOP ratio.
    data = dict(data, schema_version=2)
    for d in data.get("derived", []):
        d.setdefault("timing", d.get("ci_low") is not None or "slope" in d["name"] or "step-time" in d["name"])
    return data


def _upgrade_2_to_3(data: dict) -> dict:
    # Version 2 took one sample per round, none discarded, the cases in a fixed order, and emptied
    # CUDA caches after every command.
    data = dict(data, schema_version=3)
    cuda = data.get("device", "").startswith("cuda")
    for case in data.get("cases", []):
        case.setdefault("sampling", {"kept_per_round": 1, "discarded_per_round": 0, "order": "fixed",
                                     "cuda_cache": "emptied after every command" if cuda else "not applicable"})
    return data


# Version 3 named a metric's kind and unit by suffix: "_flops", "_macs", "_bytes", and timings as
# raw samples under "samples" plus "<stem>_median_s", "_q1_s", "_q3_s", "_ci_low_s", "_ci_high_s".
_V3_SUMMARY = ("median", "q1", "q3", "ci_low", "ci_high")
_V3_TIMING_NAMES = {"train_step_s": "train_step_time", "inference_s": "inference_time", "stat_grad_s": "stat_grad_time"}


def _v3_kind(name: str) -> tuple[str, str]:
    if name.endswith("_flops"):
        return "count", "flop"
    if name.endswith("_macs"):
        return "count", "mac"
    if name.startswith(("peak_", "nvml_")):
        return "peak", "byte"
    if name.endswith("_bytes"):
        return "count", "byte"
    return "count", "1"  # parameters, cbn_layers, max_relative_difference_to_efficient


def _upgrade_3_to_4(data: dict) -> dict:
    data = dict(data, schema_version=4)
    for case in data.get("cases", []):
        old, samples = case.get("metrics", {}), case.pop("samples", {})
        summaries = {f"{name.removesuffix('_s')}_{stat}_s" for name in samples for stat in _V3_SUMMARY}
        metrics = {}
        for name, value in old.items():
            if name not in summaries:
                kind, unit = _v3_kind(name)
                metrics[name] = {"value": value, "kind": kind, "unit": unit}
        for name, values in samples.items():
            stem = name.removesuffix("_s")
            summary = {stat: old.get(f"{stem}_{stat}_s") for stat in _V3_SUMMARY}
            metrics[_V3_TIMING_NAMES.get(name, f"{stem}_time")] = {
                "value": summary["median"], "kind": "timing", "unit": "s", "samples": values, "summary": {"n": len(values), **summary}}
        case["metrics"] = metrics
    for d in data.get("derived", []):
        d["kind"] = "timing" if d.pop("timing", False) else "count"
    return data


def _upgrade_4_to_5(data: dict) -> dict:
    # Version 5 added what a case on several processes records (bench/ranks.py): each rank's value
    # of a metric ("per_rank"), and "world_size", "backend" and "nodes" in the case's params. Every case of
    # a version 4 file ran in one process, which is what their absence means: nothing to convert.
    return dict(data, schema_version=5)


def _upgrade_5_to_6(data: dict) -> dict:
    # Version 6 added each timing sample's round ("rounds"), a case's metrics that failed to be
    # measured ("missing") and digests of its work ("work"). A version 5 case has none of them: its
    # samples were kept in consecutive groups of sampling["kept_per_round"] (Metric.by_round).
    return dict(data, schema_version=6)


UPGRADES = {0: _upgrade_0_to_1, 1: _upgrade_1_to_2, 2: _upgrade_2_to_3, 3: _upgrade_3_to_4, 4: _upgrade_4_to_5,
            5: _upgrade_5_to_6}


def read_json(path: Path, what: str) -> Any:  # JSON: checked by its reader
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"{path}: not a JSON {what} ({err})") from None


def load(path: str | Path) -> RunResult:
    """Read a results file, upgrading older schema versions; refuse anything else clearly."""
    return load_with_version(path)[0]


def load_with_version(path: str | Path) -> tuple[RunResult, int]:
    """The run (upgraded to the current schema) and the schema version the file was written in."""
    return parse(read_json(Path(path), "results file"), str(path))


def is_results_file(data: object) -> bool:
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def parse(data: Any, path: str) -> tuple[RunResult, int]:
    """load_with_version for JSON already read from path."""
    if not is_results_file(data):
        raise ResultsFileError(f"{path}: not a cbn-bench results file (no \"schema\": \"{SCHEMA}\" field)")
    stored = version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ResultsFileError(
            f"{path}: schema version {version!r} is newer than this cbn-bench understands ({SCHEMA_VERSION}); upgrade cbn-bench"
        )
    while version < SCHEMA_VERSION:
        data = UPGRADES[version](data)
        version = data["schema_version"]
    try:
        run = RunResult(
            profile=data["profile"],
            device=data["device"],
            suites=list(data["suites"]),
            environment=Environment(**data["environment"]),
            cases=[case_from_json(c) for c in data["cases"]],
            derived=[Derived(**d) for d in data.get("derived", [])],
            schema=data["schema"],
            schema_version=data["schema_version"],
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ResultsFileError(f"{path}: malformed results file ({err})") from None
    return run, stored
