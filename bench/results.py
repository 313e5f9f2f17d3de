"""Typed results and their JSON storage: one file per run, schema-versioned, written atomically.

Metric names carry their unit (``_s``, ``_bytes``, ``_flops``, ``_per_s``) and values are stored
unrounded. Raw timing samples are kept beside the summaries so any statistic can be redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "cbn-bench/results"
SCHEMA_VERSION = 2
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


@dataclass(frozen=True)
class CaseResult:
    suite: str
    case: str
    params: dict[str, Any]
    status: str
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # deterministic figures and summaries
    samples: dict[str, list[float]] = field(default_factory=dict)  # raw timing samples, seconds
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Derived:
    """A figure computed from several cases of one run, e.g. a CBN/BN ratio with its interval."""

    suite: str
    name: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    note: str = ""
    timing: bool = False  # computed from timing samples (so noisy); otherwise from deterministic counts


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

    def case(self, suite: str, case: str) -> CaseResult | None:
        return next((c for c in self.cases if c.suite == suite and c.case == case), None)

    def cases_of(self, suite: str) -> list[CaseResult]:
        return [c for c in self.cases if c.suite == suite]

    def derived_of(self, suite: str) -> dict[str, Derived]:
        return {d.name: d for d in self.derived if d.suite == suite}


# ---------------------------------------------------------------------- storage
def to_json(run: RunResult) -> str:
    return json.dumps(dataclasses.asdict(run), indent=1, allow_nan=True)


def _temp_file(folder: Path, prefix: str) -> tuple[int, str]:
    """A temp file in folder with the mode a plain open() would give (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_new(run: RunResult, folder: Path, stem: str) -> Path:
    """Store run as folder/stem.json, or stem-2.json etc.: an earlier run is never overwritten.

    The file appears atomically: written to a temp file, then hard-linked to a name that must not
    exist yet (link fails instead of replacing), then the temp name is removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(folder, ".run.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_json(run))
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(1, 1000):
            path = folder / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free results file name for {stem} in {folder}")
    finally:
        Path(tmp).unlink(missing_ok=True)


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


UPGRADES = {0: _upgrade_0_to_1, 1: _upgrade_1_to_2}


def read_json(path: Path, what: str) -> object:
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


def parse(data: object, path: str) -> tuple[RunResult, int]:
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
            cases=[CaseResult(**c) for c in data["cases"]],
            derived=[Derived(**d) for d in data.get("derived", [])],
            schema=data["schema"],
            schema_version=data["schema_version"],
        )
    except (KeyError, TypeError) as err:
        raise ResultsFileError(f"{path}: malformed results file ({err})") from None
    return run, stored
