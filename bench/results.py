"""Typed results and their JSON storage: one file per run, schema-versioned, written atomically.

Each metric says its kind and unit (bench/metrics.py); values are stored unrounded, and a timing
keeps its raw samples beside its summary, so any statistic can be redone. Each case holds the
settings it was measured with (its suite's SETTINGS dataclass, in bench/codec.py's JSON form), its
training mode and its processes, so a file renders and compares without today's code. A derived
figure has a structured id (FigureId), which the gate, baselines and tables key on, and a label
for display only. Files of schema 7 and later are upgraded on load, step by step (UPGRADES);
older ones, whose settings and figures were untyped, were rewritten once by
tools/migrate_results.py, which converts any other such file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import codec
from bench.files import write_new
from bench.metrics import Metric
from bench.suite import Case, Processes
from bench.training_modes import Mode

SCHEMA = "cbn-bench/results"
SCHEMA_VERSION = 7
FIRST_TYPED_VERSION = 7  # settings and figure ids typed; older files go through tools/migrate_results.py
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
    settings: dict[str, Any]  # the suite's SETTINGS in JSON form (bench.suite.settings_of decodes it)
    status: str  # one of STATUSES
    error: str | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # how samples were taken (bench/sampling.py)
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be measured
    work: dict[str, str] = field(default_factory=dict)  # what the case computed on, as digests (bench/suite.py)
    mode: Mode | None = None  # the training mode it ran in; None for suites that take none
    processes: Processes = Processes()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"case status {self.status!r}: choose one of {', '.join(STATUSES)}")


def result_of(case: Case, status: str, error: str | None = None, **fields: Any) -> CaseResult:
    """The result of a planned case: its settings (in JSON form), mode and processes, and fields."""
    return CaseResult(case.suite, case.name, codec.encode(case.settings), status, error, mode=case.mode,
                      processes=case.processes, **fields)


@dataclass(frozen=True)
class FigureId:
    """What a derived figure is, apart from how a table labels it. The gate's thresholds, the
    baselines and the suites' tables key on it (``key``); labels can change freely."""

    suite: str
    subject: str  # the case (or group of cases) it describes, e.g. "cbn", "resnet18/cbn", "efficient-3x3"
    quantity: str  # what is measured, e.g. "train_iter_per_s", "memory", "stat_grad_time"
    reference: str = ""  # what it is relative to, e.g. "ratio_to:bn", "minus:bn", "loglog_slope_in:C"; "" if absolute

    @property
    def key(self) -> str:
        """Its name within the suite, e.g. "cbn/train_iter_per_s/ratio_to:bn" (the gate's metric name after "<suite>.")."""
        return "/".join(part for part in (self.subject, self.quantity, self.reference) if part)

    def __str__(self) -> str:
        return f"{self.suite}.{self.key}"


@dataclass(frozen=True)
class Derived:
    """A figure computed from several cases of one run, e.g. a CBN/BN ratio with its interval."""

    id: FigureId
    label: str  # for display only: tables and the gate key on id
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    note: str = ""
    kind: str = "count"  # "timing" when computed from timing samples (so noisy), else "count" or "peak"

    @property
    def suite(self) -> str:
        return self.id.suite

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

    def derived_of(self, suite: str) -> dict[FigureId, Derived]:
        return {d.id: d for d in self.derived if d.suite == suite}


# ---------------------------------------------------------------------- storage
def to_json(run: RunResult) -> str:
    data = codec.encode(dataclasses.replace(run, cases=[]))
    data["cases"] = [case_to_json(c) for c in run.cases]
    return json.dumps(data, indent=1, allow_nan=True)


def case_to_json(case: CaseResult) -> dict:
    data = codec.encode(dataclasses.replace(case, metrics={}))
    data["metrics"] = {name: metric.to_json() for name, metric in case.metrics.items()}
    return data


def case_from_json(data: dict) -> CaseResult:
    metrics = {name: Metric.from_json(m) for name, m in data.get("metrics", {}).items()}
    return dataclasses.replace(codec.decode(CaseResult, {**data, "metrics": {}}), metrics=metrics)


def save_new(run: RunResult, folder: Path, stem: str) -> Path:
    """Store run as folder/stem.json, or stem-2.json etc.: an earlier run is never overwritten."""
    return write_new(folder, stem, ".json", to_json(run))


def stamp() -> str:
    """The UTC time that starts every stored file's name."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


# ---------------------------------------------------------------------- loading
# Schema version -> the function that upgrades a file of that version by one step.
UPGRADES: dict[int, Callable[[dict], dict]] = {}


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
    if version < FIRST_TYPED_VERSION:
        raise ResultsFileError(f"{path}: schema version {version}, from before settings and figure ids were typed; "
                               f"convert it with `python tools/migrate_results.py {path}`")
    while version < SCHEMA_VERSION:
        data = UPGRADES[version](data)
        version = data["schema_version"]
    try:
        cases = [case_from_json(c) for c in data["cases"]]
        run = codec.decode(RunResult, {**data, "cases": []})
    except (KeyError, TypeError, ValueError) as err:
        raise ResultsFileError(f"{path}: malformed results file ({err})") from None
    return dataclasses.replace(run, cases=cases), stored
