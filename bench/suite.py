"""The suite contract: what a suite gives the harness (``Suite``), checked when it is loaded, and
the typed values that pass between a suite and the harness (cases, measurements, tables).

A suite is a module named in a registry (``suites.SUITES``). Its definitions and reports run in
the runner's process; ``build(case, device)`` runs inside the case's own worker process.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar, runtime_checkable

from bench import codec
from bench.metrics import Metric
from bench.training_modes import Mode

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """The processes a case runs on together (bench/ranks.py): one, unless --nproc or --nnodes."""

    world_size: int = 1
    backend: str = ""  # the process group's ("gloo", "nccl"); "" for one process
    nodes: int = 1

    @property
    def label(self) -> str:
        """"" for one process, else e.g. ", 2 processes (gloo)" for a table's title."""
        return "" if self.world_size == 1 else f", {self.world_size} processes ({self.backend})"


@dataclass(frozen=True)
class Case:
    """One configuration a suite measures: its settings (the suite's SETTINGS dataclass), the
    training mode it runs in (None for suites that take none) and the processes it spans."""

    suite: str
    name: str
    settings: Any  # an instance of the suite's SETTINGS
    mode: Mode | None = None
    processes: Processes = Processes()
    group: str = ""  # cases of one group are timed interleaved, round by round
    rounds: int = 5  # timed rounds
    kept_per_round: int = 1  # samples kept per round (bench/sampling.py; CUDA also discards one first)
    timeout_s: float = 1800.0  # for any single phase of this case
    memory_limit_bytes: int | None = None  # address-space cap for the worker (CPU cases)
    nproc: int = 1  # processes that run the case together, launched by torchrun (bench/ranks.py)


@dataclass(frozen=True)
class Measurement:
    """The untimed pass: deterministic figures (FLOPs, counted memory) and peaks, plus notes."""

    metrics: dict[str, Metric]
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # or "skipped" (with the reason in notes): then no warm-up or timing
    error: str | None = None  # a check that failed; the case is recorded as an error
    missing: dict[str, str] = field(default_factory=dict)  # metric -> the error that kept it from being measured
    # What the case computed on, as digests (e.g. the boxes a detector's heads pooled): the cases
    # of one group must agree on every key they share, or the runner records them as errors.
    work: dict[str, str] = field(default_factory=dict)


class Workload(Protocol):
    def measure(self) -> Measurement: ...

    def warmup(self) -> None: ...

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        """One round: for each timed quantity (e.g. train_step_time, inference_time), `kept`
        consecutive samples in seconds, after `discarded` calls of the same kind whose times are
        dropped (bench/sampling.py's keep_last counts them)."""
        ...



@runtime_checkable
class Profiled(Protocol):
    """Optional, for `python -m bench profile`: a workload that names its steps."""

    def profiled_steps(self) -> dict[str, Callable[[], object]]:
        """Kind of step ("train", "inference") -> one step, called after warmup() (bench/profiling.py)."""
        ...

    def op_groups(self) -> dict[str, tuple[str, ...]]:
        """Report groups of its own (group -> words an operator's name contains), beside the
        convolutions, normalization kernels and CBN's labels bench/profiling.py knows; may be empty."""
        ...


@runtime_checkable
class Compiles(Protocol):
    """Optional: a workload that may compile in warmup() and says what torch.compile made of it."""

    def compile_census(self) -> dict[str, Metric]:
        """bench/compile_census.py's metrics of its warm-up (graphs, breaks, frames, recompiles);
        empty when it did not compile. The runner adds them to the case's metrics."""
        ...


@runtime_checkable
class ReusesCounts(Protocol):
    """Optional: a workload whose device-independent counts (FLOPs) a stored entry can supply."""

    def reuse_counts(self, entry: dict) -> None:
        """Take entry (bench/counts.py's stored metrics for these settings) instead of counting."""
        ...


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: list[str] = field(default_factory=list)
    justify: list[str] = field(default_factory=list)  # per column; default: first left, the rest right


class Suite(Protocol):
    """What a suite module defines (names as module attributes; checked by ``check_suite``)."""

    NAME: str
    SETTINGS: type  # the frozen dataclass of a case's settings, stored in the results (bench/codec.py)
    PROFILES: dict[str, Any]  # profile name -> a frozen dataclass of its settings
    OPTIONS: dict[str, tuple[str, ...]]  # option -> allowed values, the first the default (--set KEY=VALUE)
    COUNTS: dict[str, str]  # device-independent count metrics -> unit, reusable from bench/counts.py; may be empty

    def default_profile(self, device: str) -> str: ...

    def cases(self, profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]: ...

    def build(self, case: Case, device: str) -> Workload: ...  # in the worker process

    def derive(self, cases: list[Any]) -> list[Any]: ...  # CaseResults of one run -> Derived figures

    def tables(self, run: Any) -> list[Table]: ...  # a RunResult, rendered from what it stores

    def figures(self, run: Any, stem: Path) -> list[Path]: ...  # plots written beside the results; may be none


_CALLABLES = ("default_profile", "cases", "build", "derive", "tables", "figures")


def check_suite(module: ModuleType) -> ModuleType:
    """The module, if it satisfies Suite; otherwise a ValueError naming every gap."""
    gaps = [f"{name} (a function)" for name in _CALLABLES if not callable(getattr(module, name, None))]
    if not isinstance(getattr(module, "NAME", None), str):
        gaps.append("NAME (a str)")
    settings = getattr(module, "SETTINGS", None)
    if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        gaps.append("SETTINGS (a dataclass)")
    profiles = getattr(module, "PROFILES", None)
    if not isinstance(profiles, dict) or not profiles or not all(dataclasses.is_dataclass(p) for p in profiles.values()):
        gaps.append("PROFILES (a non-empty dict of profile name -> dataclass)")
    options = getattr(module, "OPTIONS", None)
    if not isinstance(options, dict) or not all(isinstance(v, tuple) and v for v in options.values()):
        gaps.append("OPTIONS (a dict of option -> non-empty tuple of values)")
    if not isinstance(getattr(module, "COUNTS", None), dict):
        gaps.append("COUNTS (a dict of metric -> unit; empty if none)")
    if gaps:
        raise ValueError(f"suite module {module.__name__} does not satisfy bench.suite.Suite: it lacks "
                         + ", ".join(gaps))
    return module


def encode_case(case: Case) -> dict[str, Any]:
    """A case as JSON (what the runner sends a worker)."""
    return codec.encode(case)


def decode_case(suite: ModuleType, data: dict[str, Any]) -> Case:
    """A case from encode_case, its settings rebuilt as the suite's SETTINGS."""
    case = codec.decode(Case, data)
    return dataclasses.replace(case, settings=codec.decode(suite.SETTINGS, case.settings))


def settings_of(cls: type[T], case: Any) -> T:
    """A stored case's settings (bench.results.CaseResult.settings, JSON) as the suite's SETTINGS cls."""
    return codec.decode(cls, case.settings)


def resolve_options(suite: str, allowed: dict[str, tuple[str, ...]], options: dict[str, str] | None) -> dict[str, str]:
    """Every option of a suite, given or defaulted (the first allowed value); an unknown option or
    value is a ValueError naming the choices."""
    options = options or {}
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"{suite} has no option {', '.join(sorted(unknown))}; it takes {', '.join(allowed)}")
    chosen = {key: options.get(key, values[0]) for key, values in allowed.items()}
    for key, value in chosen.items():
        if value not in allowed[key]:
            raise ValueError(f"{suite} option {key}={value!r}: choose one of {', '.join(allowed[key])}")
    return chosen


def load_suite(registry: dict[str, str], name: str) -> ModuleType:
    if name not in registry:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(registry)}")
    return check_suite(importlib.import_module(registry[name]))
