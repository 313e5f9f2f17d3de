"""The runner-worker protocol: typed messages, one JSON line each, with a protocol version.

The runner (bench/runner.py) sends ``Start``, then requests (``Measure``, ``Warmup``, ``Round``,
``Profile``) and finally ``Exit``; the worker (bench/worker.py) answers ``Start`` with ``Ready``,
each request with its reply (``Measured``, ``Warmed``, ``Timed``, ``Profiled``) and any failure
with ``Failed``, after which it exits. ``encode`` and ``decode`` (over bench/codec.py) make a message
``{"type": <class name>, "protocol": PROTOCOL_VERSION, <its fields>}``; a line of another version
or type is refused by name, so a runner and a worker from different checkouts cannot
misunderstand each other silently. Field values are JSON values (a metric travels in
bench.metrics.Metric's own JSON form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bench import codec

PROTOCOL_VERSION = 3  # 2: a case's settings, mode and processes typed (bench.suite.Case); 3: Warmed.metrics


class ProtocolError(ValueError):
    """A line that is not a message of this protocol version."""


# ---------------------------------------------------------------------- runner -> worker
@dataclass(frozen=True)
class Start:
    case: dict[str, Any]  # bench.suite.Case as a dict
    suite_module: str
    device: str
    threads: int | None = None
    math_modes: dict[str, Any] = field(default_factory=dict)  # bench.cuda_math.CudaMath as a dict
    known_counts: dict[str, Any] | None = None  # bench/counts.py's stored entry for this case


@dataclass(frozen=True)
class Measure:
    """The untimed pass: deterministic figures, peaks, notes."""


@dataclass(frozen=True)
class Warmup:
    empty_cache: bool = False  # CUDA: empty the caching allocator afterwards


@dataclass(frozen=True)
class Round:
    kept: int = 1  # samples kept per timed quantity
    discarded: int = 0  # calls timed and dropped before them
    empty_cache: bool = False


@dataclass(frozen=True)
class Profile:
    kinds: list[str]  # "train", "inference"
    steps: int
    memory: bool
    stem: str  # path prefix of the traces


@dataclass(frozen=True)
class Exit:
    pass


# ---------------------------------------------------------------------- worker -> runner
@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Measured:
    metrics: dict[str, Any]  # name -> bench.metrics.Metric's JSON form
    notes: list[str] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    missing: dict[str, str] = field(default_factory=dict)
    work: dict[str, str] = field(default_factory=dict)
    cuda_peak_reserved_bytes: int | None = None  # CUDA: what the runner's cache policy needs
    cuda_total_bytes: int | None = None


@dataclass(frozen=True)
class Warmed:
    metrics: dict[str, Any] = field(default_factory=dict)  # a compiling workload's census (bench.suite.Compiles)


@dataclass(frozen=True)
class Timed:
    samples: dict[str, list[float]]  # quantity -> seconds (the slowest rank's, on several processes)
    rank_samples: dict[str, list[list[float]]] = field(default_factory=dict)  # quantity -> each rank's


@dataclass(frozen=True)
class Profiled:
    profiles: dict[str, dict[str, Any]]  # kind -> bench/profiling.py's summary


@dataclass(frozen=True)
class Failed:
    error: str
    traceback: str = ""


Request = Start | Measure | Warmup | Round | Profile | Exit
Reply = Ready | Measured | Warmed | Timed | Profiled | Failed
MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (Start, Measure, Warmup, Round, Profile, Exit, Ready,
                                                            Measured, Warmed, Timed, Profiled, Failed)}


def encode(message: Request | Reply) -> str:
    """One JSON line (without its newline)."""
    return json.dumps({"type": type(message).__name__, "protocol": PROTOCOL_VERSION, **codec.encode(message)})


def decode(line: str) -> Any:
    """The message a line holds (a Request or a Reply); ProtocolError for anything else."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"not a protocol line ({err}): {line[:200]!r}") from None
    if not isinstance(data, dict) or data.get("type") not in MESSAGES:
        raise ProtocolError(f"not a protocol message: {line[:200]!r}")
    if data.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {data.get('protocol')!r}, this side speaks {PROTOCOL_VERSION}: "
                            "runner and worker come from different versions of bench")
    cls = MESSAGES[data.pop("type")]
    data.pop("protocol")
    try:
        return codec.decode(cls, data)
    except codec.CodecError as err:
        raise ProtocolError(str(err)) from None
