"""Plan and execute a run of suites: validate the request, run the cases with progress, derive
figures, store the results and print their tables. Used by `python -m bench run` and by the
regression commands (bench/regression.py)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench import env, report, results
from bench.runner import ProgressHook, run_cases, steps
from bench.suite import Case, load_suite

SUITES_PACKAGE = "suites"  # a package whose SUITES maps suite names to modules
DEFAULT_OUT = Path("results") / "runs"
# Redirected output (nox, CI logs) gets a wide console instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)


def suite_registry() -> dict[str, str]:
    return importlib.import_module(SUITES_PACKAGE).SUITES


@dataclass(frozen=True)
class Plan:
    """What a run will do: validated suites, device, profile and cases."""

    names: list[str]
    suites: dict[str, ModuleType]
    device: str
    profile: str
    cases: list[Case]


def plan(names: list[str], profile: str | None, device: str | None, rounds: int | None = None,
         options: dict[str, dict[str, str]] | None = None) -> Plan:
    registry = suite_registry()
    names = names or list(registry)
    suites = {name: load_suite(registry, name) for name in names}
    device = device or env.best_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; drop --device to use the CPU profile")
    profile = profile or next(iter(suites.values())).default_profile(device)
    for name, suite in suites.items():
        if profile not in suite.PROFILES:
            raise ValueError(f"suite {name!r} has no profile {profile!r}; it has: {', '.join(suite.PROFILES)}")
    if rounds is not None and rounds < 1:
        raise ValueError("--rounds must be at least 1")
    options = options or {}
    cases = [c for name, suite in suites.items() for c in suite.cases(profile, device, options.get(name, {}))]
    if rounds is not None:
        cases = [dataclasses.replace(c, rounds=rounds) for c in cases]
    return Plan(names, suites, device, profile, cases)


def execute(p: Plan, threads: int | None, out: Path) -> tuple[results.RunResult, list[Path], bool]:
    """Run the plan's cases, store and print the results: (run, files written, interrupted)."""
    if threads:
        torch.set_num_threads(threads)  # the workers' count, so the environment records it
    environment = env.capture(p.device)
    console.print(f"cbn-bench: {len(p.cases)} cases of {', '.join(p.names)} at profile [bold]{p.profile}[/bold] "
                  f"on {environment.device_name}")
    case_results, interrupted = _run_with_progress(p.cases, suite_registry(), p.device, threads)
    derived = [d for name, suite in p.suites.items() for d in suite.derive([c for c in case_results if c.suite == name])]
    run_result = results.RunResult(p.profile, p.device, p.names, environment, case_results, derived)
    paths = _store(run_result, p.suites, out)
    report.print_tables(tables(run_result, p.suites), console)
    console.print("results written to:\n" + "\n".join(f"  {path}" for path in paths))
    for case in case_results:
        if case.status == "error":
            console.print(f"[red]{case.suite}/{case.case} failed:[/red] {case.error.splitlines()[0] if case.error else ''}")
    if interrupted:
        console.print("[yellow]interrupted: the results above hold every case that finished[/yellow]")
    return run_result, paths, interrupted


def _run_with_progress(cases, registry, device, threads):
    total = sum(steps(c) for c in cases)
    if not console.is_terminal:  # a log (nox, CI): one line per phase instead of a live bar
        started, done = time.perf_counter(), [0]

        def log(text: str) -> None:
            console.print(f"[{done[0]}/{total}] {time.perf_counter() - started:6.0f} s  {text}", highlight=False)

        def advance() -> None:
            done[0] += 1

        return run_cases(cases, registry, device, threads, ProgressHook(describe=log, advance=advance))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=total)
        hook = ProgressHook(describe=lambda text: progress.update(task, description=text),
                            advance=lambda: progress.advance(task))
        outcome = run_cases(cases, registry, device, threads, hook)
        progress.update(task, completed=total, description="done")
    return outcome


def tables(run_result: results.RunResult, suites: dict) -> list:
    return [t for suite in suites.values() for t in suite.tables(run_result)]


def _store(run_result: results.RunResult, suites: dict, out: Path) -> list[Path]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}_{run_result.profile}_{results.slug(run_result.environment.device_name)}"
    json_path = results.save_new(run_result, out, stem)
    heading = f"cbn-bench run {json_path.stem}"
    text = report.markdown(tables(run_result, suites), heading, preamble(run_result))
    md_path = json_path.with_suffix(".md")
    results.write_atomic(md_path, text)
    paths = [json_path, md_path]
    for suite in suites.values():
        if hasattr(suite, "figures"):
            paths += suite.figures(run_result, json_path.with_suffix(""))
    return paths


def preamble(run_result: results.RunResult) -> list[str]:
    e = run_result.environment
    return [
        f"- device: {e.device_name} (x{e.device_count}), driver {e.driver_version}, CUDA {e.cuda_version}, cuDNN {e.cudnn_version}",
        f"- torch {e.torch_version}, torchvision {e.torchvision_version}; cudnn.benchmark={e.cudnn_benchmark}, "
        f"TF32 matmul={e.tf32_matmul}, TF32 cudnn={e.tf32_cudnn}, threads={e.threads}",
        f"- CPU: {e.cpu_model}; Python {e.python_version}; {e.platform}",
        f"- commit {e.git_commit} (dirty: {e.git_dirty}); {e.date_utc}; command: `{e.command}`",
    ]
