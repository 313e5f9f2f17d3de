"""A tiny suite for the runner's tests: cases that work, raise, run out of memory, crash or skip."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ranks, sampling
from bench.metrics import Collected, count, peak
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.suite import Case, Measurement, Table

NAME = "fake"


@dataclass(frozen=True)
class Profile:
    size: str


@dataclass(frozen=True)
class Settings:
    """What a fake case does: its label (logged per timed call), its behaviour and where it logs."""

    label: str
    log: str
    behaviour: str = "ok"
    work: str = "same"  # its work digest
    pids: str = ""  # a file each process that held the case appends its pid to


SETTINGS = Settings


PROFILES = {"smoke": Profile("tiny")}
OPTIONS: dict = {}
COUNTS: dict = {}


def default_profile(device: str) -> str:
    return "smoke"


def cases(profile: str, device: str, options=None) -> list[Case]:
    return []  # tests build their own Case lists


class Workload:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = Path(settings.log)
        if settings.pids:  # which processes held this case (tests/test_ranks.py)
            with Path(settings.pids).open("a") as f:
                f.write(f"{os.getpid()}\n")
        if settings.behaviour == "raise_on_build":
            raise RuntimeError("deliberate failure while building")

    def measure(self) -> Measurement:
        behaviour = self.settings.behaviour
        if ranks.world_size() > 1:  # a case on several processes (tests/test_ranks.py)
            if behaviour == "crash_rank1" and ranks.rank() == 1:
                os._exit(3)
            return Measurement({"answer_flops": count(42.0, "flop"), "peak_bytes": peak(100.0 * (1 + ranks.rank()))},
                               [f"rank {ranks.rank()} of {ranks.world_size()}"])
        if behaviour == "oom":
            hog = bytearray(8 << 30)  # over the case's memory limit: MemoryError
            return Measurement({"bytes": count(len(hog), "byte")})
        if behaviour == "crash":
            os._exit(3)
        if behaviour == "skip":
            return Measurement({}, ["not applicable here"], status="skipped")
        if behaviour == "check_fails":
            return Measurement({"difference": count(1.0, "1")}, error="paths disagree")
        if behaviour == "metric_fails":  # one metric raises; the rest, and the timing, are kept
            found = Collected()
            found.attempt(("answer_flops",), lambda: {"answer_flops": count(42.0, "flop")})
            found.attempt(("traced_macs",), lambda: 1 / 0)
            return Measurement(found.metrics, ["measured"], missing=found.missing, work={"inputs": "same"})
        work = {"inputs": self.settings.work}
        return Measurement({"answer_flops": count(42.0, "flop")}, ["measured"], work=work)

    def warmup(self) -> None:
        pass

    def compile_census(self) -> dict:
        """What a compiling workload reports after its warm-up (bench.suite.Compiles)."""
        return {"compiled_graphs": count(2.0, "1")} if self.settings.behaviour == "census" else {}

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        return sampling.keep_last(self._call, kept, discarded)

    def _call(self) -> dict[str, float]:
        with self.log.open("a") as f:
            f.write(self.settings.label + "\n")
        behaviour = self.settings.behaviour
        if behaviour == "hang" or (behaviour == "hang_rank1" and ranks.rank() == 1):
            time.sleep(600)  # far past any case's timeout in the tests
        return {"work_time": 0.001 * (1 + len(self.settings.label)) * (1 + ranks.rank())}


def build(case: Case, device: str) -> Workload:
    return Workload(case.settings)


def derive(case_results: list[CaseResult]) -> list[Derived]:
    return [Derived(FigureId(NAME, "all", "cases_ok"), "cases ok", float(sum(c.status == "ok" for c in case_results)))]


def tables(run: RunResult) -> list[Table]:
    return [Table("fake", ["case", "status"], [[c.case, c.status] for c in run.cases])]


def figures(run: RunResult, stem: Path) -> list[Path]:
    return []
