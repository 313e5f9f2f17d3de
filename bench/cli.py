"""Command line: `python -m bench [run] [SUITE ...] [options]`, `show FILE`, and the regression
commands `gate`, `baseline`, `spread` and `micro` (bench/regression.py)."""

from __future__ import annotations

import argparse
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
from bench.suite import Case, Table, load_suite

SUITES_PACKAGE = "suites"  # a package whose SUITES maps suite names to modules
DEFAULT_OUT = Path("results") / "runs"
# Redirected output (nox, CI logs) gets a wide console instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)


def suite_registry() -> dict[str, str]:
    return importlib.import_module(SUITES_PACKAGE).SUITES


def parser() -> argparse.ArgumentParser:
    registry = suite_registry()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run suites (the default command)")
    run.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all of {', '.join(registry)})")
    run.add_argument("--profile", help="sizes to run at: paper (default on CUDA), cpu (default without GPU), smoke")
    run.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    run.add_argument("--rounds", type=int, help="timed rounds per case (default: the profile's)")
    run.add_argument("--threads", type=int, help="torch CPU threads in each worker (default: torch's)")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for results (default: {DEFAULT_OUT})")
    run.add_argument("--compare", type=Path, metavar="FILE", help="a previous results file to compare ratios with")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a suite option, e.g. placement=all")
    for key, help_text in (("placement", "table6: heads (paper default) or all (also backbone stages 2-4)"),
                           ("arch", "table6: mask_rcnn or faster_rcnn"), ("depth", "table6: ResNet depth, 50 or 101")):
        run.add_argument(f"--{key}", help=f"{help_text}; same as --set {key}=...")
    show = sub.add_parser("show", help="print the tables of a stored results file")
    show.add_argument("file", type=Path)
    from bench import regression  # it builds on this module's run machinery

    regression.add_parsers(sub)
    return p


COMMANDS = ("run", "show", "gate", "baseline", "spread", "micro")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    from bench import regression

    commands = {"run": run, "show": lambda a: show(a.file), "gate": regression.gate_command,
                "baseline": regression.baseline_command, "spread": regression.spread_command,
                "micro": regression.micro_command}
    try:
        return commands[args.command](args)
    except (ValueError, results.ResultsFileError) as err:  # ThresholdsError and GateError are ValueErrors
        console.print(f"[red]error:[/red] {err}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


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
    report.print_tables(_tables(run_result, p.suites), console)
    console.print("results written to:\n" + "\n".join(f"  {path}" for path in paths))
    for case in case_results:
        if case.status == "error":
            console.print(f"[red]{case.suite}/{case.case} failed:[/red] {case.error.splitlines()[0] if case.error else ''}")
    if interrupted:
        console.print("[yellow]interrupted: the results above hold every case that finished[/yellow]")
    return run_result, paths, interrupted


def run(args: argparse.Namespace) -> int:
    registry = suite_registry()
    chosen = {name: load_suite(registry, name) for name in (args.suites or registry)}
    p = plan(args.suites, args.profile, args.device, args.rounds, suite_options(args, chosen))
    previous = results.load(args.compare) if args.compare else None
    run_result, _, interrupted = execute(p, args.threads, args.out)
    if previous is not None:
        report.print_tables([compare_table(previous, run_result)], console)
    if interrupted:
        return 130
    return 1 if any(c.status == "error" for c in run_result.cases) else 0


def suite_options(args: argparse.Namespace, suites: dict) -> dict[str, dict[str, str]]:
    """Each suite's share of --set KEY=VALUE (and its shorthands); a key no suite takes is an error."""
    pairs = list(args.set) + [f"{k}={getattr(args, k)}" for k in ("placement", "arch", "depth") if getattr(args, k)]
    options: dict[str, dict[str, str]] = {name: {} for name in suites}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: write it as KEY=VALUE")
        takers = [name for name, suite in suites.items() if key in suite.OPTIONS]
        if not takers:
            raise ValueError(f"no selected suite takes option {key!r}")
        for name in takers:
            options[name][key] = value
    return options


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


def _tables(run_result: results.RunResult, suites: dict) -> list:
    return [t for suite in suites.values() for t in suite.tables(run_result)]


def _store(run_result: results.RunResult, suites: dict, out: Path) -> list[Path]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}_{run_result.profile}_{results.slug(run_result.environment.device_name)}"
    json_path = results.save_new(run_result, out, stem)
    heading = f"cbn-bench run {json_path.stem}"
    text = report.markdown(_tables(run_result, suites), heading, _preamble(run_result))
    md_path = json_path.with_suffix(".md")
    results.write_atomic(md_path, text)
    paths = [json_path, md_path]
    for suite in suites.values():
        if hasattr(suite, "figures"):
            paths += suite.figures(run_result, json_path.with_suffix(""))
    return paths


def _preamble(run_result: results.RunResult) -> list[str]:
    e = run_result.environment
    return [
        f"- device: {e.device_name} (x{e.device_count}), driver {e.driver_version}, CUDA {e.cuda_version}, cuDNN {e.cudnn_version}",
        f"- torch {e.torch_version}, torchvision {e.torchvision_version}; cudnn.benchmark={e.cudnn_benchmark}, "
        f"TF32 matmul={e.tf32_matmul}, TF32 cudnn={e.tf32_cudnn}, threads={e.threads}",
        f"- CPU: {e.cpu_model}; Python {e.python_version}; {e.platform}",
        f"- commit {e.git_commit} (dirty: {e.git_dirty}); {e.date_utc}; command: `{e.command}`",
    ]


def compare_table(previous: results.RunResult, current: results.RunResult) -> Table:
    if (previous.profile, previous.environment.device_name) != (current.profile, current.environment.device_name):
        raise ValueError(
            f"--compare: the previous run is profile {previous.profile!r} on {previous.environment.device_name!r}, this one "
            f"{current.profile!r} on {current.environment.device_name!r}; only like with like can be compared"
        )
    before = {(d.suite, d.name): d for d in previous.derived}
    rows = []
    for d in current.derived:
        old = before.get((d.suite, d.name))
        change = "-" if old is None or old.value == 0 else f"{100 * (d.value / old.value - 1):+.1f}%"
        rows.append([f"{d.suite}: {d.name}", report.fmt(None if old is None else old.value), report.fmt(d.value), change])
    return Table("comparison with the previous run", ["figure", "previous", "current", "change"], rows)


def show(path: Path) -> int:
    run_result = results.load(path)
    registry = suite_registry()
    suites = {name: load_suite(registry, name) for name in run_result.suites}
    console.print("\n".join(_preamble(run_result)))
    report.print_tables(_tables(run_result, suites), console)
    return 0
