"""Typed metrics: each says its kind (a deterministic count, a timing, an observed peak) and unit.

A timing keeps its raw samples with its summary beside them (as pytest-benchmark keeps ``stats``
with ``data``), and its value is the median. Nothing downstream reads a kind from a name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import summarize

KINDS = ("count", "timing", "peak")
# count: repeats exactly for the same settings and versions (FLOPs, counted bytes, parameters);
# timing: seconds, noisy, compared only as ratios within one run; peak: an observed high-water
# mark (allocator or RSS peak), repeatable to within allocator behaviour.
UNITS = ("flop", "mac", "byte", "s", "1")


@dataclass(frozen=True)
class Metric:
    value: float
    kind: str
    unit: str
    samples: tuple[float, ...] = ()  # timing only: every raw sample, seconds
    summary: dict[str, float] | None = None  # timing only: n, median, q1, q3, ci_low, ci_high
    per_rank: tuple[float, ...] = ()  # a case on several processes: each rank's value (bench/ranks.py)
    rounds: tuple[int, ...] = ()  # timing only: the timed round each sample was taken in (bench/runner.py)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.unit not in UNITS:
            raise ValueError(f"metric unit {self.unit!r}: choose one of {', '.join(UNITS)}")
        if (self.kind == "timing") != bool(self.samples):
            raise ValueError("a timing metric has samples, and only a timing metric has them")
        if self.rounds and len(self.rounds) != len(self.samples):
            raise ValueError(f"{len(self.samples)} samples but {len(self.rounds)} round numbers")

    @property
    def timing(self) -> bool:
        return self.kind == "timing"

    def by_round(self, per_round: int = 1) -> dict[int, list[float]]:
        """The samples keyed by their round; without stored rounds (older files), consecutive
        groups of per_round samples (what the runner kept per round then)."""
        rounds = self.rounds or tuple(i // per_round for i in range(len(self.samples)))
        out: dict[int, list[float]] = {}
        for r, value in zip(rounds, self.samples):
            out.setdefault(r, []).append(value)
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data["per_rank"] = list(self.per_rank)
        data["rounds"] = list(self.rounds)
        if not self.timing:
            del data["samples"], data["summary"]
        for name in ("per_rank", "rounds"):
            if not data[name]:
                del data[name]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Metric:
        return Metric(data["value"], data["kind"], data["unit"], tuple(data.get("samples", ())), data.get("summary"),
                      tuple(data.get("per_rank", ())), tuple(data.get("rounds", ())))


def count(value: float, unit: str) -> Metric:
    return Metric(value, "count", unit)


def peak(value: float, unit: str = "byte") -> Metric:
    return Metric(value, "peak", unit)


def timing(samples: list[float], per_rank: tuple[float, ...] = (), rounds: tuple[int, ...] = ()) -> Metric:
    """A timing from raw samples (seconds): value = median, with quartiles and a bootstrap 95% CI;
    per_rank: each rank's median, when the samples are the slowest rank's (bench/ranks.py);
    rounds: the timed round of each sample, for ratios paired by round (bench/stats.py)."""
    s = summarize(samples)
    summary = {"n": s.n, "median": s.median, "q1": s.q1, "q3": s.q3, "ci_low": s.ci_low, "ci_high": s.ci_high}
    return Metric(s.median, "timing", "s", tuple(samples), summary, tuple(per_rank), tuple(rounds))


class Collected:
    """Metrics measured one after another, each in isolation: one that raises is recorded as
    missing, with its error, and the others are kept (a failing FLOP trace must not cost a case its
    timings)."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.missing: dict[str, str] = {}

    def attempt(self, names: tuple[str, ...], measure) -> None:
        """measure() returns a dict of some of names -> Metric; on an exception every name is missing."""
        try:
            self.metrics.update(measure())
        except Exception as err:  # noqa: BLE001 (any failure of one metric is that metric's, recorded)
            first_line = next(iter(str(err).splitlines()), "")
            for name in names:
                self.missing[name] = f"{type(err).__name__}: {first_line}"
