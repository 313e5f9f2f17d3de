"""Command line: `python -m bench [run] [SUITE ...] [options]`, `show FILE`, and the regression
commands `gate`, `baseline`, `spread` and `micro` (bench/regression.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import regression, report, results
from bench.runs import DEFAULT_OUT, console, execute, plan, preamble, suite_registry, tables
from bench.suite import Table, load_suite


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
    regression.add_parsers(sub)
    return p


COMMANDS = ("run", "show", "gate", "baseline", "spread", "micro")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
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
    console.print("\n".join(preamble(run_result)))
    report.print_tables(tables(run_result, suites), console)
    return 0
