"""Suites written for pytest-benchmark (``suites.PYTEST_SUITES``, e.g. the layer micro-benchmarks):
run them in a pytest subprocess and read their JSON as an ordinary run.

pytest-benchmark writes one JSON file per run; the suite's conftest adds cbn-bench's environment
under ``machine_info["cbn_bench"]``. Read back, each benchmark is a case ``<group>/<norm>`` with a
timing metric ``time`` (every sample kept) and the counts its extra_info holds (``COUNTED``), its
settings a ``BenchmarkSettings``, and each norm's ratio to the group's reference
(``extra_info["reference"]``) is a derived figure with id ``<group>/<norm>/min_time/ratio_to:<reference>``,
so the gate treats these files like any results file.

The gate's ratios are of minimum times: the benchmarks run one after another, not interleaved,
and on a shared machine the minimum of hundreds of rounds moved 4-16% between identical runs
where the median moved 15-100% (docs/calibration.md).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import codec, results
from bench.files import write_atomic
from bench.metrics import Metric, count
from bench.results import CaseResult, Derived, Environment, FigureId, ResultsFileError, RunResult, read_json, slug
from bench.stats import quartiles, ratio_of_medians
from bench.suite import Table, settings_of
from bench.training_modes import Mode

SCHEMA = "cbn-bench/micro"
SCHEMA_VERSION = 1
# Every sample is kept (pytest-benchmark stores them under stats.data), so any statistic can be redone.
TIMING_OPTIONS = ("--benchmark-warmup=on", "--benchmark-min-rounds=10", "--benchmark-max-time=1.0",
                  "--benchmark-disable-gc", "--benchmark-sort=name")
# Deterministic counts a benchmark may store in its extra_info (bench/dispatch.py): read as count metrics.
COUNTED = ("aten_ops", "host_syncs")
# On CUDA a sample is the device's time between two CUDA events, over at least 10 ms of calls.
CUDA_TIMING_OPTIONS = ("--benchmark-timer=bench.cuda_clock.now", "--benchmark-min-time=0.01")


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a benchmark records of itself in its extra_info that decides what it measures: its
    group (the op timed), its norm, whether it is its group's reference and the input's shape.
    (What it times, ``extra_info["subject"]``, is a description: the case's note, for captions.)"""

    group: str
    norm: str
    reference: bool = False
    shape_nchw: tuple[int, ...] | None = None


def registry() -> dict[str, Path]:
    return dict(importlib.import_module("suites").PYTEST_SUITES)


def run(suite: str, device: str, out: Path, threads: int | None = None, mode: Mode = Mode()) -> tuple[RunResult, Path]:
    """Run a pytest-benchmark suite in a subprocess, in mode; its JSON lands atomically in out."""
    try:
        importlib.import_module("pytest_benchmark")
    except ImportError:
        raise ValueError("the micro-benchmarks need pytest-benchmark: pip install -e '.[test]' "
                         "(or use python3 -m nox -s micro)") from None
    benchmark_file = registry()[suite]
    out.mkdir(parents=True, exist_ok=True)
    stamp = results.stamp()
    partial = out / f".{stamp}_{suite}.json.partial"
    command = [sys.executable, "-m", "pytest", str(benchmark_file), "-p", "no:cacheprovider", "-q",
               f"--benchmark-json={partial}", f"--micro-device={device}", *TIMING_OPTIONS]
    if device == "cuda":
        command += CUDA_TIMING_OPTIONS
    if threads:
        command.append(f"--micro-threads={threads}")
    command += [f"--micro-{key.replace('_', '-')}={value}" for key, value in mode.options().items()]
    try:
        code = subprocess.run(command, cwd=benchmark_file.parents[1]).returncode
        if not partial.exists():
            raise ValueError(f"the {suite} benchmarks produced no results (pytest exit {code}); its output is above")
        if code != 0:  # the JSON holds the benchmarks that ran; the gate lists the others as missing
            print(f"pytest exit {code}: some {suite} benchmarks failed (output above); kept the others", file=sys.stderr)
        measured = load(partial)
        path = out / f"{stamp}_{suite}_{slug(measured.environment.device_name)}.json"
        write_atomic(path, partial.read_bytes())  # pytest-benchmark writes in place; the final name appears whole
    finally:
        partial.unlink(missing_ok=True)
    return measured, path


def is_pytest_benchmark_file(data: object) -> bool:
    return isinstance(data, dict) and "benchmarks" in data and "machine_info" in data


def load(path: str | Path) -> RunResult:
    return from_json(read_json(Path(path), "micro-benchmark file"), str(path))


def from_json(data: Any, path: str) -> RunResult:
    info = data.get("machine_info", {}).get("cbn_bench") if is_pytest_benchmark_file(data) else None
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        raise ResultsFileError(f"{path}: not a cbn-bench micro-benchmark file (pytest-benchmark JSON from "
                               "`python -m bench micro`, with machine_info.cbn_bench)")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(f"{path}: micro schema version {info.get('schema_version')!r}; this cbn-bench reads "
                               f"{SCHEMA_VERSION}: rerun `python -m bench micro`")
    try:
        mode = Mode.from_options(info.get("mode", {}))  # files written before modes existed ran fp32, eager
        cases = [_case(b, mode) for b in data["benchmarks"]]
        environment = Environment(**info["environment"])
    except (KeyError, TypeError) as err:
        raise ResultsFileError(f"{path}: malformed micro-benchmark file (missing {err})") from None
    return RunResult(info["profile"], info["device"], ["micro"], environment, cases, _ratios(cases),
                     schema=SCHEMA, schema_version=info["schema_version"])


def _case(benchmark: dict, mode: Mode) -> CaseResult:
    samples = tuple(float(t) for t in benchmark["stats"]["data"])
    q1, median, q3 = quartiles(samples)
    # pytest-benchmark keeps hundreds of samples: quartiles, no bootstrap (ratios get theirs in the table)
    summary = {"n": len(samples), "median": median, "q1": q1, "q3": q3, "min": min(samples)}
    extra = benchmark["extra_info"]
    settings = BenchmarkSettings(benchmark["group"], extra["norm"], bool(extra.get("reference")),
                                 tuple(extra["shape_nchw"]) if extra.get("shape_nchw") else None)
    metrics = {"time": Metric(median, "timing", "s", samples, summary)}
    metrics.update({name: count(extra[name], "1") for name in COUNTED if name in extra})
    subject = [extra["subject"]] if extra.get("subject") else []
    return CaseResult("micro", f"{settings.group}/{settings.norm}", codec.encode(settings), "ok", metrics=metrics,
                      notes=subject, mode=mode)


def _settings(case: CaseResult) -> BenchmarkSettings:
    return settings_of(BenchmarkSettings, case)


def _ratios(cases: list[CaseResult]) -> list[Derived]:
    """Each norm's minimum time over its group reference's minimum time."""
    settings = {c.case: _settings(c) for c in cases}
    references = {settings[c.case].group: c for c in cases if settings[c.case].reference}
    out = []
    for c in cases:
        here = settings[c.case]
        ref = references.get(here.group)
        if ref is None or c is ref:
            continue
        value = min(c.metrics["time"].samples) / min(ref.metrics["time"].samples)
        reference = settings[ref.case].norm
        out.append(Derived(FigureId("micro", c.case, "min_time", f"ratio_to:{reference}"),
                           f"{here.group}: {here.norm}/{reference} time ratio (minimum times)", value,
                           note="ratio of minimum times", kind="timing"))
    return out


def table(run: RunResult, path: str = "") -> Table:
    settings = {c.case: _settings(c) for c in run.cases}
    groups = list(dict.fromkeys(s.group for s in settings.values()))
    norms = list(dict.fromkeys(s.norm for s in settings.values()))
    by_key = {(settings[c.case].group, settings[c.case].norm): c for c in run.cases}
    references = {settings[c.case].group: c for c in run.cases if settings[c.case].reference}
    rows = []
    for norm in norms:
        row = [norm]
        for group in groups:
            case, ref = by_key.get((group, norm)), references.get(group)
            if case is None:
                row += ["skipped", "", ""]
                continue
            samples = case.metrics["time"].samples
            if ref is None:
                row += [f"{1e3 * min(samples):.3g}", "-", "-"]
                continue
            m = ratio_of_medians(samples, ref.metrics["time"].samples)
            row += [f"{1e3 * min(samples):.3g}", f"{min(samples) / min(ref.metrics['time'].samples):.2f}",
                    f"{m.median:.2f} [{m.ci_low:.2f}, {m.ci_high:.2f}]"]
        rows.append(row)
    columns = ["norm"] + [f"{g} {what}" for g in groups for what in ("min ms", "x ref (min)", "x ref (median [95% CI])")]
    reference = ", ".join(sorted({settings[c.case].norm for c in references.values()})) or "none"
    subjects = ", ".join(sorted({note for c in run.cases for note in c.notes})) or "subject not recorded"
    caption = [f"{subjects}; reference {reference}; the gate reads the ratios of minimum times",
               f"device {run.environment.device_name}, profile {run.profile}" + (f"; file {path}" if path else "")]
    mode = (run.cases[0].mode if run.cases else None) or Mode()
    return Table(f"Layer micro-benchmarks ({mode.label})", columns, rows, caption)
