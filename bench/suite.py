"""What a suite gives the harness: cases to run, how to build each, and how to report them.

A suite is a module (named in the registry the CLI reads, ``suites.SUITES``) with:

* ``NAME``: str, and ``PROFILES``: dict of profile name -> a short description
* ``default_profile(device) -> str``
* ``cases(profile, device) -> list[Case]``
* ``build(case, device) -> Workload`` (runs inside the case's own worker process)
* ``derive(cases: list[CaseResult]) -> list[Derived]`` (ratios etc., from one run)
* ``tables(run: RunResult) -> list[Table]`` and optionally ``figures(run, stem: Path) -> list[Path]``
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    params: dict[str, Any]
    group: str = ""  # cases of one group are timed interleaved, round by round
    rounds: int = 5  # timed rounds (one sample per timing per round)
    timeout_s: float = 1800.0  # for any single phase of this case
    memory_limit_bytes: int | None = None  # address-space cap for the worker (CPU cases)


@dataclass(frozen=True)
class Measurement:
    """The untimed pass: deterministic figures (FLOPs, counted memory) and peaks, plus notes."""

    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # or "skipped" (with the reason in notes): then no warm-up or timing
    error: str | None = None  # a check that failed; the case is recorded as an error


class Workload(Protocol):
    def measure(self) -> Measurement: ...

    def warmup(self) -> None: ...

    def timed_round(self) -> dict[str, float]:
        """One sample, in seconds, of each timed quantity (e.g. train_step_s, inference_s)."""
        ...


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: list[str] = field(default_factory=list)
    justify: list[str] = field(default_factory=list)  # per column; default: first left, the rest right


def load_suite(registry: dict[str, str], name: str) -> ModuleType:
    if name not in registry:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(registry)}")
    return importlib.import_module(registry[name])
