"""Run the pytest-benchmark micro-benchmarks (``suites.MICRO_BENCHMARKS``) and read their JSON.

pytest-benchmark writes one JSON file per run; the suite's conftest adds cbn-bench's environment
under ``machine_info["cbn_bench"]``. Within each group the benchmark marked ``reference`` in its
``extra_info`` is the denominator of every ratio, so ratios come from one run on one machine.

The gate's ratios are of minimum times (pytest-benchmark's default sort): the benchmarks run one
after another, not interleaved, and on a shared machine the minimum of hundreds of rounds moved
4-16% between identical runs where the median moved 15-100% (results/README.md).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from bench.results import ResultsFileError, read_json, slug
from bench.stats import Summary, ratio_of_medians
from bench.suite import Table

SCHEMA = "cbn-bench/micro"
SCHEMA_VERSION = 1
DEFAULT_OUT = Path("results") / "micro"
# Every sample is kept (pytest-benchmark stores them under stats.data), so any statistic can be redone.
TIMING_OPTIONS = ("--benchmark-warmup=on", "--benchmark-min-rounds=10", "--benchmark-max-time=1.0",
                  "--benchmark-disable-gc", "--benchmark-sort=name")


@dataclass(frozen=True)
class Benchmark:
    group: str
    norm: str
    reference: bool
    samples_s: list[float]


@dataclass(frozen=True)
class MicroRun:
    path: str
    device: str
    profile: str
    schema_version: int
    environment: dict
    benchmarks: list[Benchmark]

    def ratios(self) -> dict[tuple[str, str], float]:
        """(group, norm) -> minimum time over the group reference's minimum time."""
        references = {b.group: min(b.samples_s) for b in self.benchmarks if b.reference}
        return {(b.group, b.norm): min(b.samples_s) / references[b.group] for b in self.benchmarks if b.group in references}

    def median_ratios(self) -> dict[tuple[str, str], Summary]:
        """The same with medians, and bootstrap 95% intervals (2000 resamples each: for tables only)."""
        references = {b.group: b for b in self.benchmarks if b.reference}
        return {(b.group, b.norm): ratio_of_medians(b.samples_s, references[b.group].samples_s)
                for b in self.benchmarks if b.group in references}

    @property
    def reference_norms(self) -> dict[str, str]:
        return {b.group: b.norm for b in self.benchmarks if b.reference}


def benchmark_file() -> Path:
    return Path(importlib.import_module("suites").MICRO_BENCHMARKS)


def run(device: str, out: Path, threads: int | None = None, extra_args: tuple[str, ...] = ()) -> MicroRun:
    """Run the micro-benchmarks in a pytest subprocess; the JSON lands atomically in out."""
    try:
        importlib.import_module("pytest_benchmark")
    except ImportError:
        raise ValueError("the micro-benchmarks need pytest-benchmark: pip install -e '.[test]' "
                         "(or use python3 -m nox -s micro)") from None
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    partial = out / f".{stamp}_micro.json.partial"
    command = [sys.executable, "-m", "pytest", str(benchmark_file()), "-p", "no:cacheprovider", "-q",
               f"--benchmark-json={partial}", f"--micro-device={device}", *TIMING_OPTIONS, *extra_args]
    if threads:
        command.append(f"--micro-threads={threads}")
    try:
        code = subprocess.run(command, cwd=benchmark_file().parents[1]).returncode
        if not partial.exists():
            raise ValueError(f"the micro-benchmarks produced no results (pytest exit {code}); its output is above")
        if code != 0:  # the JSON holds the benchmarks that ran; the gate lists the others as missing
            print(f"pytest exit {code}: some micro-benchmarks failed (output above); kept the others", file=sys.stderr)
        measured = load(partial)
        path = out / f"{stamp}_micro_{slug(measured.environment.get('device_name', device))}.json"
        os.replace(partial, path)  # pytest-benchmark writes in place; the final name appears whole
    finally:
        partial.unlink(missing_ok=True)
    return replace(measured, path=str(path))


def is_micro_file(data: object) -> bool:
    return isinstance(data, dict) and "benchmarks" in data and "machine_info" in data


def load(path: str | Path) -> MicroRun:
    return from_json(read_json(Path(path), "micro-benchmark file"), str(path))


def from_json(data: object, path: str) -> MicroRun:
    info = data.get("machine_info", {}).get("cbn_bench") if is_micro_file(data) else None
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        raise ResultsFileError(f"{path}: not a cbn-bench micro-benchmark file (pytest-benchmark JSON from "
                               "`python -m bench micro`, with machine_info.cbn_bench)")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(f"{path}: micro schema version {info.get('schema_version')!r}; this cbn-bench reads "
                               f"{SCHEMA_VERSION}: rerun `python -m bench micro`")
    try:
        benchmarks = [Benchmark(b["group"], b["extra_info"]["norm"], bool(b["extra_info"].get("reference")),
                                [float(t) for t in b["stats"]["data"]]) for b in data["benchmarks"]]
    except (KeyError, TypeError) as err:
        raise ResultsFileError(f"{path}: malformed micro-benchmark file (missing {err})") from None
    return MicroRun(path, info["device"], info["profile"], info["schema_version"], info.get("environment", {}), benchmarks)


def table(micro: MicroRun) -> Table:
    ratios, medians = micro.ratios(), micro.median_ratios()
    groups = list(dict.fromkeys(b.group for b in micro.benchmarks))
    norms = list(dict.fromkeys(b.norm for b in micro.benchmarks))
    fastest = {(b.group, b.norm): min(b.samples_s) for b in micro.benchmarks}
    rows = []
    for norm in norms:
        row = [norm]
        for group in groups:
            key = (group, norm)
            if key not in fastest:
                row += ["skipped", "", ""]
                continue
            m = medians.get(key)
            row += [f"{1e3 * fastest[key]:.3g}", "-" if key not in ratios else f"{ratios[key]:.2f}",
                    "-" if m is None else f"{m.median:.2f} [{m.ci_low:.2f}, {m.ci_high:.2f}]"]
        rows.append(row)
    columns = ["norm"] + [f"{g} {what}" for g in groups for what in ("min ms", "x ref (min)", "x ref (median [95% CI])")]
    reference = ", ".join(sorted(set(micro.reference_norms.values()))) or "none"
    caption = [f"conv 3x3 + norm, training mode; reference {reference}; the gate reads the ratios of minimum times",
               f"device {micro.environment.get('device_name', micro.device)}, profile {micro.profile}; file {micro.path}"]
    return Table("Layer micro-benchmarks", columns, rows, caption)
