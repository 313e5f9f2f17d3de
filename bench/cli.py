"""The command line, all of it: `python -m bench [run] [SUITE ...]`, `show`, `counts`, `recover`,
`micro`, and the gate's `gate`, `baseline` and `spread` (implemented in bench/gate/commands.py)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

from bench import codec, counts, env, index, profiling, pytest_suites, ranks, report, results, session, training_modes
from bench.gate import commands as gate_commands
from bench.session import console
from bench.suite import Table, load_suite

PROFILES_OUT = Path("results") / "profiles"


def parser() -> argparse.ArgumentParser:
    registry = session.suite_registry()
    every = [*registry, *pytest_suites.registry()]
    declared = {name: load_suite(registry, name) for name in registry}  # profiles and options come from the suites
    profile_help = _profile_help(declared)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run suites (the default command)")
    run.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all of {', '.join(registry)})")
    run.add_argument("--profile", help=profile_help)
    run.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    run.add_argument("--rounds", type=int, help="timed rounds per case (default: the profile's)")
    run.add_argument("--threads", type=int, help="torch CPU threads in each worker (default: torch's)")
    run.add_argument("--out", type=Path, default=session.DEFAULT_OUT, help=f"folder for results (default: {session.DEFAULT_OUT})")
    run.add_argument("--compare", type=Path, metavar="FILE", help="a previous results file to compare ratios with")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="processes per case, launched by torchrun (DistributedDataParallel; gloo on CPU, NCCL on CUDA, "
                          "one GPU per process); figures are reduced across them (default: 1)")
    run.add_argument("--cases", type=lambda text: text.split(","), metavar="NAME[,NAME]",
                     help="run only these cases, e.g. bn,gn,cbn (default: all of the profile's)")
    nodes = run.add_argument_group("several machines", "run the same command on each, with its own --node-rank; node 0 "
                                   "drives the run and writes the results (torchrun's static rendezvous per case)")
    nodes.add_argument("--nnodes", type=int, default=1, help="machines each case spans (default: 1)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 to nnodes - 1 (default: 0)")
    nodes.add_argument("--master-addr", help="the address of node 0, reachable from every node")
    nodes.add_argument("--master-port", type=int, default=29500,
                       help="node 0's first rendezvous port; case i of a group uses port + i (default: 29500)")
    _suite_options(run, declared)

    show = sub.add_parser("show", help="print the tables of a stored results file")
    show.add_argument("file", type=Path)

    index_cmd = sub.add_parser("index", help="rebuild results/README.md's table of stored files from their environment blocks")
    index_cmd.add_argument("--results", type=Path, default=Path("results"), help="the results folder (default: results)")
    index_cmd.add_argument("--check", action="store_true", help="exit 1 if the table is out of date, write nothing")

    counted = sub.add_parser("counts", help="count FLOPs once on this machine and store them for later runs to reuse")
    counted.add_argument("suites", nargs="*", metavar="SUITE", help="suites to count (default: those with COUNTS)")
    counted.add_argument("--profile", help="the profile whose cases to count, e.g. paper")
    counted.add_argument("--device", choices=["cuda", "cpu"], default="cpu", help="default: cpu (counts do not depend on it)")
    counted.add_argument("--threads", type=int, help="torch CPU threads in each worker (default: torch's)")
    counted.add_argument("--out", type=Path, default=counts.DEFAULT_FOLDER, help=f"store folder (default: {counts.DEFAULT_FOLDER})")
    counted.add_argument("--from", dest="from_run", type=Path, metavar="FILE",
                         help="store the counts a results file measured instead of counting again")
    _suite_options(counted, declared)

    recover = sub.add_parser("recover", help="turn the journal of a run that died into its results file")
    recover.add_argument("journal", type=Path, help="the .<run>.journal.jsonl file left in the results folder")
    recover.add_argument("--out", type=Path, help="folder for the results file (default: the journal's)")

    prof = sub.add_parser("profile", help="where each norm's step time goes (torch.profiler), side by side with a reference norm")
    profiled = list(profiled_suites())
    prof.add_argument("--suite", choices=profiled, default=profiled[0],
                      help=f"whose step to profile, as suites.PROFILED declares (default: {profiled[0]})")
    prof.add_argument("--norm", action="append", metavar="NORM", help="a norm to profile (repeatable; default: cbn)")
    prof.add_argument("--against", default="bn", metavar="NORM", help="the reference norm (default: bn)")
    prof.add_argument("--profile", help=profile_help + " (for a suite that has profiles)")
    prof.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    prof.add_argument("--steps", type=int, default=3, help="profiled steps per norm, after 2 unrecorded ones (default: 3)")
    prof.add_argument("--inference", action="store_true", help="also profile inference steps (where the workload has them)")
    prof.add_argument("--memory", action="store_true", help="also write a CUDA allocator snapshot per norm (CUDA only)")
    prof.add_argument("--out", type=Path, default=PROFILES_OUT, help=f"folder for the report and traces (default: {PROFILES_OUT})")
    _suite_options(prof, declared)

    micro = sub.add_parser("micro", help="run the pytest-benchmark layer micro-benchmarks")
    micro.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    micro.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    micro.add_argument("--out", type=Path, default=session.DEFAULT_OUT, help=f"folder for the JSON (default: {session.DEFAULT_OUT})")
    _mode_options(micro)

    gate = sub.add_parser("gate", help="compare with the stored baseline under the thresholds; exit 1 on a regression",
                          description=gate_commands.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gate.add_argument("suites", nargs="*", metavar="SUITE",
                      help=f"suites to measure, of {', '.join(every)} (default: those the thresholds file has rules for)")
    gate.add_argument("--results", nargs="+", type=Path, metavar="FILE",
                      help="judge these results / micro-benchmark files instead of measuring (no re-measuring)")
    gate.add_argument("--baseline", nargs="+", type=Path, metavar="FILE",
                      help=f"baseline files (default: {gate_commands.BASELINES}/<device class>/<profile>.json and micro.json)")
    gate.add_argument("--thresholds", type=Path, default=gate_commands.THRESHOLDS,
                      help=f"rules file (default: {gate_commands.THRESHOLDS})")
    _measure_options(gate)
    gate.add_argument("--no-retry", action="store_true", help="judge failed timing rules without re-measuring them")

    baseline = sub.add_parser("baseline", help="measure and store the baselines the gate compares with")
    baseline.add_argument("--folder", type=Path, default=gate_commands.BASELINES,
                          help=f"where baselines live (default: {gate_commands.BASELINES})")
    baseline.add_argument("suites", nargs="*", metavar="SUITE",
                          help=f"suites to measure (default: those {gate_commands.THRESHOLDS} has rules for)")
    baseline.add_argument("--skip-micro", action="store_true", help="leave the micro-benchmark baseline as it is")
    baseline.add_argument("--counts-only", action="store_true",
                          help="take only the exact counts (FLOPs, counted bytes, dispatched ops) from this measurement "
                               "and keep the baseline's timings, which belong to the machine that measured them")
    _measure_options(baseline)

    spread = sub.add_parser("spread", help="how timing metrics moved over repeated identical runs (to calibrate tolerances)")
    spread.add_argument("files", nargs="+", type=Path, metavar="FILE", help="results or micro-benchmark files of one kind")
    return p


def _profile_help(suites: dict) -> str:
    names = list(dict.fromkeys(name for suite in suites.values() for name in suite.PROFILES))
    on_gpu = sorted({suite.default_profile("cuda") for suite in suites.values()})
    on_cpu = sorted({suite.default_profile("cpu") for suite in suites.values()})
    return f"sizes to run at: {', '.join(names)} (default: {'/'.join(on_gpu)} on CUDA, {'/'.join(on_cpu)} without)"


def shorthands(suites: dict) -> dict[str, str]:
    """--KEY for every option a suite declares (the training mode has flags of its own): option ->
    help, naming the suites that take it and its values."""
    takers: dict[str, list[str]] = {}
    values: dict[str, tuple[str, ...]] = {}
    for name, suite in suites.items():
        for key, allowed in suite.OPTIONS.items():
            if key not in training_modes.OPTIONS:
                takers.setdefault(key, []).append(name)
                values[key] = allowed
    return {key: f"{', '.join(names)}: {' or '.join(values[key])} (default {values[key][0]})" for key, names in takers.items()}


def _suite_options(p: argparse.ArgumentParser, suites: dict) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a suite option, e.g. placement=all")
    for key, help_text in shorthands(suites).items():
        p.add_argument(f"--{key}", help=f"{help_text}; same as --set {key}=...")
    _mode_options(p)


def _mode_options(p: argparse.ArgumentParser) -> None:
    """The training mode (bench/training_modes.py), for the suites that take it (those whose OPTIONS hold it)."""
    p.add_argument("--precision", choices=list(training_modes.PRECISIONS), help="fp32 (default), or bf16 / fp16 autocast "
                   "(fp16 with a GradScaler, CUDA only); same as --set precision=...")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last memory format")
    p.add_argument("--compile", nargs="?", const="default", choices=training_modes.COMPILE_MODES, metavar="MODE",
                   help="torch.compile the models (each suite's docs say which parts), in torch.compile's MODE: "
                   f"{', '.join(training_modes.COMPILE_MODES)} (default default; reduce-overhead needs CUDA); "
                   "put it after the suite names")
    p.add_argument("--fullgraph", action="store_true", help="with --compile: torch.compile(fullgraph=True), so a graph "
                   "break fails the case instead of splitting the graph")




def _measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=gate_commands.GATE_PROFILE,
                   help=f"profile of the harness suites (default: {gate_commands.GATE_PROFILE})")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the baseline's, else torch's)")
    p.add_argument("--out", type=Path, default=gate_commands.GATE_OUT,
                   help=f"folder for the measurements (default: {gate_commands.GATE_OUT})")
    _mode_options(p)


COMMANDS = {
    "run": lambda a: run(a),
    "show": lambda a: show(a.file),
    "index": lambda a: rebuild_index(a.results, a.check),
    "counts": lambda a: count(a),
    "recover": lambda a: recover(a),
    "micro": lambda a: micro(a),
    "profile": lambda a: profile(a),
    "gate": gate_commands.gate_command,
    "baseline": gate_commands.baseline_command,
    "spread": gate_commands.spread_command,
}


UNDER_TORCHRUN = ("the harness launches each case's processes itself, a torchrun per case, so that a case that fails "
                  "or hangs cannot take the others down: run `python -m bench --nproc N ...` (one process, not under "
                  "torchrun), or `nox -s bench -- --nproc N`")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun in the processes it starts
        console.print(f"[red]error:[/red] {UNDER_TORCHRUN}")
        return 2
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, results.ResultsFileError) as err:  # the gate's errors are ValueErrors too
        console.print(f"[red]error:[/red] {err}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


def run(args: argparse.Namespace) -> int:
    registry = session.suite_registry()
    chosen = {name: load_suite(registry, name) for name in (args.suites or registry)}
    nodes = ranks.Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    p = session.plan(args.suites, args.profile, args.device, args.rounds, suite_options(args, chosen), args.nproc,
                     args.cases, nodes)
    if nodes.rank > 0:
        return session.follow(p)
    previous = None
    if args.compare:  # checked before measuring, so a wrong file costs nothing
        previous = results.load(args.compare)
        check_comparable(previous, p.profile, env.device_name(p.device))
    run_result, _, interrupted = session.execute(p, args.threads, args.out)
    if previous is not None:
        report.print_tables([compare_table(previous, run_result)], console)
    if interrupted:
        return 130
    return 1 if any(c.status == "error" for c in run_result.cases) else 0


def count(args: argparse.Namespace) -> int:
    if args.from_run:
        written = session.counts_from_run(args.from_run, args.out)
        if not written:
            raise ValueError(f"{args.from_run}: no finished case with stored settings and counts to keep")
        for path in written:
            console.print(f"counts stored in {path}")
        return 0
    registry = session.suite_registry()
    names = args.suites or [n for n in registry if load_suite(registry, n).COUNTS]
    chosen = {name: load_suite(registry, name) for name in names}
    p = session.plan(names, args.profile, args.device, options=suite_options(args, chosen))
    for path in session.count(p, args.threads, args.out):
        console.print(f"counts stored in {path}")
    return 0


def recover(args: argparse.Namespace) -> int:
    paths = session.recover(args.journal, args.out)
    console.print("results written to:\n" + "\n".join(f"  {path}" for path in paths))
    return 0


def profile(args: argparse.Namespace) -> int:
    norms = list(dict.fromkeys([args.against, *(args.norm or ["cbn"])]))
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    device = args.device or env.best_device()
    cases, module, profile_name = _profiled_cases(args, norms, device)
    session.check_writable(args.out)
    environment = env.capture(device)
    kinds = ["train"] + (["inference"] if args.inference else [])
    stem = args.out / f"{results.stamp()}_{args.suite}_{profile_name}_{results.slug(environment.device_name)}"
    console.print(f"profiling {', '.join(norms)} ({args.suite}, {profile_name}) on {environment.device_name}: "
                  f"{args.steps} steps each after 2 unrecorded ones ...")
    found = profiling.run(cases, module, device, kinds, args.steps, args.memory, stem)
    settings = {"suite": args.suite, "profile": profile_name, "device": device, "reference": args.against,
                "steps": args.steps, "cases": {c.name: codec.encode(c.settings) for c in cases},
                "mode": codec.encode(cases[0].mode) if cases else None}
    shown = profiling.tables_of({**settings, "environment": dataclasses.asdict(environment), "profiles": found})
    report.print_tables(shown, console)
    notes = [] if device == "cuda" or not args.memory else ["--memory: the allocator snapshot is CUDA-only; none written"]
    written = profiling.store(stem, shown, found, settings, environment, notes)
    console.print("written:\n" + "\n".join(f"  {path}" for path in written))
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    return 0


def _profiled_cases(args: argparse.Namespace, norms: list[str], device: str) -> tuple[list, str, str]:
    """The cases to profile (the suite's declaration: suites.PROFILED), the module that builds them
    in the worker, and the profile's name."""
    module = profiled_suites()[args.suite]
    suite = importlib.import_module(module)
    options = suite_options(args, {args.suite: suite})[args.suite]
    found, profile_name = suite.profiled_cases(norms, args.profile, device, options)
    return found, module, profile_name


def profiled_suites() -> dict[str, str]:
    """Suite name -> the module whose profiled_cases `python -m bench profile` calls."""
    return dict(importlib.import_module("suites").PROFILED)


def micro(args: argparse.Namespace) -> int:
    out = args.out
    session.check_writable(out)
    device = args.device or env.best_device()
    measured, path = pytest_suites.run("micro", device, out, args.threads, training_modes.from_args(args).check(device))
    report.print_tables([pytest_suites.table(measured, str(path))], console)
    console.print(f"results written to:\n  {path}")
    return 0


def suite_options(args: argparse.Namespace, suites: dict) -> dict[str, dict[str, str]]:
    """Each suite's share of --set KEY=VALUE (and its shorthands and mode flags); a key no suite
    takes is an error."""
    every = {name: load_suite(session.suite_registry(), name) for name in session.suite_registry()}
    pairs = list(args.set) + [f"{k}={getattr(args, k)}" for k in shorthands(every) if getattr(args, k, None)]
    pairs += [f"{k}={v}" for k, v in training_modes.from_args(args).options().items() if v != training_modes.OPTIONS[k][0]]
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


def check_comparable(previous: results.RunResult, profile: str, device_name: str) -> None:
    if (previous.profile, previous.environment.device_name) != (profile, device_name):
        raise ValueError(
            f"--compare: the previous run is profile {previous.profile!r} on {previous.environment.device_name!r}, this one "
            f"{profile!r} on {device_name!r}; only like with like can be compared"
        )


def compare_table(previous: results.RunResult, current: results.RunResult) -> Table:
    check_comparable(previous, current.profile, current.environment.device_name)
    before = {d.id: d for d in previous.derived}
    rows = []
    for d in current.derived:
        old = before.get(d.id)
        change = "-" if old is None or old.value == 0 else f"{100 * (d.value / old.value - 1):+.1f}%"
        rows.append([f"{d.suite}: {d.label}", report.fmt(None if old is None else old.value), report.fmt(d.value), change])
    return Table("comparison with the previous run", ["figure", "previous", "current", "change"], rows)


def rebuild_index(folder: Path, check: bool) -> int:
    readme = folder / "README.md"
    if check:
        current = readme.exists() and readme.read_text() == index.rebuilt(readme, folder)
        console.print(f"{readme} is up to date" if current else f"[red]{readme} is out of date:[/red] run `python -m bench index`")
        return 0 if current else 1
    changed, listed = index.update(readme, folder)
    console.print(f"{readme}: {'rewritten' if changed else 'unchanged'} ({listed} files)")
    return 0


def show(path: Path) -> int:
    data = results.read_json(path, "results file")
    if isinstance(data, dict) and data.get("schema") == profiling.SCHEMA:
        report.print_tables(profiling.tables_of(data), console)
        return 0
    if pytest_suites.is_pytest_benchmark_file(data):
        run_result = pytest_suites.from_json(data, str(path))
        console.print("\n".join(session.preamble(run_result)))
        report.print_tables([pytest_suites.table(run_result, str(path))], console)
        return 0
    run_result = results.parse(data, str(path))[0]
    registry = session.suite_registry()
    suites = {name: load_suite(registry, name) for name in run_result.suites}
    console.print("\n".join(session.preamble(run_result)))
    report.print_tables(session.tables(run_result, suites), console)
    return 0
