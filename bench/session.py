"""One benchmark session: plan a run of suites (validate the request), run its cases with progress
and a journal, derive figures, store the results and print their tables; also count FLOPs to
store and recover a dead run's journal. Used by bench/cli.py and the gate (bench/gate/commands.py)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench import codec, counts, cuda_math, env, files, journal, protocol, ranks, report, results, runner
from bench.runner import ProgressHook, WorkerProcess, run_cases, steps
from bench.suite import Case, Processes, load_suite

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
    nproc: int = 1  # processes per case on each node (bench/ranks.py)
    nodes: ranks.Nodes = ranks.Nodes()


def plan(names: list[str], profile: str | None, device: str | None, rounds: int | None = None,
         options: dict[str, dict[str, str]] | None = None, nproc: int = 1, only: list[str] | None = None,
         nodes: ranks.Nodes = ranks.Nodes()) -> Plan:
    """The validated run; nproc: processes per case on each node; only: the case names to keep;
    nodes: the machines the cases span."""
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
    if only:
        unknown = sorted(set(only) - {c.name for c in cases})
        if unknown:
            raise ValueError(f"--cases: no case {', '.join(unknown)} in {', '.join(names)} at profile {profile}; "
                             f"it has {', '.join(dict.fromkeys(c.name for c in cases))}")
        cases = [c for c in cases if c.name in only]
    ranks.check_nproc(nproc, device)
    nodes.check()
    if nproc * nodes.count > 1:  # what the results record of it, in each case
        processes = Processes(nproc * nodes.count, ranks.backend_for(device), nodes.count)
        cases = [dataclasses.replace(c, nproc=nproc, processes=processes) for c in cases]
    return Plan(names, suites, device, profile, cases, nproc, nodes)


def check_writable(folder: Path) -> None:
    """Fail before measuring, not after, when the results cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"cannot write results to {folder} ({err.strerror or err}); choose another folder with --out") from None


def execute(p: Plan, threads: int | None, out: Path) -> tuple[results.RunResult, list[Path], bool]:
    """Run the plan's cases, store and print the results: (run, files written, interrupted).

    Each finished group of cases goes to a journal first (bench/journal.py), removed once the
    results file is written: a failing write or a killed runner loses no finished case."""
    check_writable(out)
    threads = threads or (ranks.threads_per_rank(p.nproc) if p.nproc > 1 else None)
    if threads:
        torch.set_num_threads(threads)  # the workers' count, so the environment records it
    if p.device.startswith("cuda"):
        cuda_math.DEFAULT.apply()  # as in every worker, so the environment records what was used
    environment = env.capture(p.device)
    per_case = f", {p.nproc} processes each ({ranks.backend_for(p.device)}, torchrun)" if p.nproc > 1 else ""
    console.print(f"cbn-bench: {len(p.cases)} cases of {', '.join(p.names)} at profile [bold]{p.profile}[/bold] "
                  f"on {environment.device_name}{per_case}")
    known = known_counts(p, environment)
    if known:
        console.print(f"reusing stored counts for {len(known)} of {len(p.cases)} cases ({counts.DEFAULT_FOLDER})")
    stem = f"{results.stamp()}_{p.profile}_{results.slug(environment.device_name)}"
    log = journal.start(journal.path_for(out, stem), {"stem": stem, "profile": p.profile, "device": p.device,
                                                      "suites": p.names, "environment": dataclasses.asdict(environment)})
    case_results, interrupted = _run_with_progress(p.cases, suite_registry(), p.device, threads, known,
                                                   lambda group: journal.append(log, group), p.nodes)
    run_result = assemble(p.profile, p.device, p.names, environment, case_results, p.suites)
    try:
        paths = store(run_result, p.suites, out, stem)
    except OSError as err:
        raise ValueError(f"could not write the results ({err}); every finished case is in {log}: "
                         f"`python -m bench recover {log}` turns it into a results file") from None
    log.unlink()
    report.print_tables(tables(run_result, p.suites), console)
    console.print("results written to:\n" + "\n".join(f"  {path}" for path in paths))
    for case in case_results:
        if case.status == "error":
            console.print(f"[red]{case.suite}/{case.case} failed:[/red] {case.error.splitlines()[0] if case.error else ''}")
    if interrupted:
        console.print("[yellow]interrupted: the results above hold every case that finished[/yellow]")
    return run_result, paths, interrupted


def known_counts(p: Plan, environment: results.Environment) -> dict[tuple[str, str], dict]:
    """Stored device-independent counts (bench/counts.py) for the plan's cases, where the key matches."""
    known = {}
    for name, suite in p.suites.items():
        if not suite.COUNTS:
            continue
        stored = counts.load(counts.DEFAULT_FOLDER, name)
        for case in (c for c in p.cases if c.suite == name):
            entry = stored.get(counts.key(codec.encode(case.settings), environment.torch_version, environment.torchvision_version,
                                          environment.cbn_source))
            if entry is not None and set(suite.COUNTS) <= set(entry["metrics"]):
                known[(name, case.name)] = entry
    return known


def count(p: Plan, threads: int | None, folder: Path) -> list[Path]:
    """Measure each case once (no timing) and store the counts its suite names in COUNTS."""
    environment = env.capture(p.device)
    written = []
    for name, suite in p.suites.items():
        names = suite.COUNTS
        if not names:
            console.print(f"{name}: stores no counts (its suite names no COUNTS); skipped")
            continue
        measured = []
        for case in (c for c in p.cases if c.suite == name):
            started = time.perf_counter()
            console.print(f"{name}/{case.name}: counting ...", highlight=False)
            worker = WorkerProcess(case, suite_registry()[name], p.device, threads)
            try:
                reply = worker.request(protocol.Measure())
            finally:
                worker.close()
            metrics = {k: reply.metrics[k] for k in names if k in reply.metrics}
            console.print(f"  {metrics} in {time.perf_counter() - started:.0f} s", highlight=False)
            measured.append((codec.encode(case.settings), metrics))
        written.append(counts.save(folder, name, measured, environment.torch_version, environment.torchvision_version,
                                   environment.cbn_source, environment.device_name))
    return written


def counts_from_run(path: Path, folder: Path) -> list[Path]:
    """Store the counts a results file measured (its cases' stored settings are the key)."""
    run_result = results.load(path)
    if run_result.environment.cbn_source is None:
        raise ValueError(f"{path}: the run recorded no cbn source digest (it predates them), so its counts cannot be "
                         "matched to the layer's code; count again with `python -m bench counts`")
    registry = suite_registry()
    written = []
    for name in run_result.suites:
        names = load_suite(registry, name).COUNTS
        measured = [(c.settings, {k: c.metrics[k].value for k in names}) for c in run_result.cases_of(name)
                    if c.status == "ok" and set(names) <= set(c.metrics)]
        if measured:
            e = run_result.environment
            written.append(counts.save(folder, name, measured, e.torch_version, e.torchvision_version, e.cbn_source,
                                       f"{e.device_name} (from {path.name})"))
    return written


def follow(p: Plan) -> int:
    """This node's share of a run whose node 0 is another machine (bench/ranks.py): 1 if a case's
    processes here failed (node 0's results hold the error)."""
    console.print(f"cbn-bench: node {p.nodes.rank} of {p.nodes.count}, {p.nproc} processes per case, following node 0 "
                  f"at {p.nodes.master_addr}; node 0 writes the results")
    failures = runner.follow_node_zero(p.cases, p.device, p.nodes, ProgressHook(describe=lambda text: console.print(text)))
    for line in failures:
        console.print(f"[red]{line}[/red]")
    return 1 if failures else 0


def _run_with_progress(cases, registry, device, threads, known, on_group, nodes):
    total = sum(steps(c) for c in cases)
    if not console.is_terminal:  # a log (nox, CI): one line per phase instead of a live bar
        started, done = time.perf_counter(), [0]

        def log(text: str) -> None:
            console.print(f"[{done[0]}/{total}] {time.perf_counter() - started:6.0f} s  {text}", highlight=False)

        def advance() -> None:
            done[0] += 1

        return run_cases(cases, registry, device, threads, ProgressHook(describe=log, advance=advance), known, on_group,
                         nodes)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=total)
        hook = ProgressHook(describe=lambda text: progress.update(task, description=text),
                            advance=lambda: progress.advance(task))
        outcome = run_cases(cases, registry, device, threads, hook, known, on_group, nodes)
        progress.update(task, completed=total, description="done")
    return outcome


def tables(run_result: results.RunResult, suites: dict) -> list:
    return [t for suite in suites.values() for t in suite.tables(run_result)]


def assemble(profile: str, device: str, names: list[str], environment: results.Environment,
             case_results: list[results.CaseResult], suites: dict) -> results.RunResult:
    """The run: its cases and the figures each suite derives from its own."""
    derived = [d for name, suite in suites.items() for d in suite.derive([c for c in case_results if c.suite == name])]
    return results.RunResult(profile, device, names, environment, case_results, derived)


def recover(path: Path, out: Path | None = None) -> list[Path]:
    """A results file (and its report) from the journal a dead run left; the journal is removed."""
    header, case_results = journal.read(path)
    registry = suite_registry()
    suites = {name: load_suite(registry, name) for name in header["suites"]}
    environment = results.Environment(**header["environment"])
    run_result = assemble(header["profile"], header["device"], header["suites"], environment, case_results, suites)
    paths = store(run_result, suites, out or path.parent, header["stem"])
    path.unlink()
    return paths


def store(run_result: results.RunResult, suites: dict, out: Path, stem: str) -> list[Path]:
    json_path = results.save_new(run_result, out, stem)
    heading = f"cbn-bench run {json_path.stem}"
    text = report.markdown(tables(run_result, suites), heading, preamble(run_result))
    md_path = json_path.with_suffix(".md")
    files.write_atomic(md_path, text)
    paths = [json_path, md_path]
    for suite in suites.values():
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
