"""The commands that guard against regressions: `gate`, `baseline` and `spread` (bench/cli.py
holds their arguments).

`gate` measures the quick suites (or reads results files), compares them with the baseline of the
same device class and profile under results/thresholds.toml, re-measures a failed timing rule once,
and exits 0 (all rules hold), 1 (a regression or a missing metric) or 2 (a usage problem).
`baseline` measures the same way and stores the files the gate compares with (with --counts-only,
only the exact counts go into the stored files: bench/gate/refresh.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench import env, files, pytest_suites, report, results, session, training_modes
from bench.gate import refresh, sources, thresholds, verdicts
from bench.gate.sources import Source
from bench.suite import load_suite

BASELINES = Path("results") / "baselines"
THRESHOLDS = Path("results") / "thresholds.toml"
GATE_OUT = Path("results") / "gate"  # measurements the gate makes; not committed
GATE_PROFILE = "quick"


# ---------------------------------------------------------------------- measuring
def measure(names: list[str], profile: str, device: str, threads: int | None, out: Path,
            mode: training_modes.Mode = training_modes.Mode()) -> list[Source]:
    """Run the named suites (harness suites in one run, then each pytest-benchmark suite) into
    sources, in mode (the suites that take no mode run as they always do)."""
    found = []
    pytest_names = [n for n in names if n in pytest_suites.registry()]
    harness = [n for n in names if n not in pytest_names]
    if harness:
        registry = session.suite_registry()
        options = {n: mode.options() for n in harness if training_modes.takes_mode(load_suite(registry, n))}
        run, paths, interrupted = session.execute(session.plan(harness, profile, device, options=options), threads, out)
        if interrupted:
            raise KeyboardInterrupt
        found.append(sources.from_run(run, str(paths[0]), results.SCHEMA_VERSION))
    for name in pytest_names:
        measured, path = pytest_suites.run(name, device, out, threads, mode)
        report.print_tables([pytest_suites.table(measured, str(path))], session.console)
        found.append(sources.from_run(measured, str(path), measured.schema_version))
    return found


def _suites(names: list[str], rules: list[thresholds.Rule]) -> list[str]:
    """names, checked; by default every suite the thresholds hold a rule for (a suite with nothing
    to guard, such as statistics, is not measured)."""
    known = [*session.suite_registry(), *pytest_suites.registry()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown suite {unknown[0]!r}; available: {', '.join(known)}")
    guarded = {rule.suite for rule in rules}
    return names or [n for n in known if n in guarded]


def _planned_sources(names: list[str], profile: str, device: str, mode: training_modes.Mode) -> list[tuple[str, str, training_modes.Mode]]:
    """(kind, profile, mode) of the files a measurement of names will produce."""
    pytest_names = [n for n in names if n in pytest_suites.registry()]
    kinds = [(results.SCHEMA, profile, mode)] if len(pytest_names) < len(names) else []
    return kinds + ([(pytest_suites.SCHEMA, device, mode)] if pytest_names else [])


def _threads(args: argparse.Namespace, baselines: list[Source]) -> tuple[int | None, list[str]]:
    """The thread count to measure with: asked for, else the baseline's when this machine has the cores."""
    if args.threads:
        return args.threads, []
    wanted = next((b.threads for b in baselines if b.threads), None)
    cores = os.cpu_count() or 1
    if wanted and wanted > cores:
        return None, [f"the baseline used {wanted} threads; this machine has {cores} cores: timing ratios may shift"]
    return wanted, []


# ---------------------------------------------------------------------- commands
def gate_command(args: argparse.Namespace) -> int:
    rules = thresholds.load(args.thresholds)
    if args.results and args.suites:
        raise ValueError("give SUITEs to measure or --results FILEs to judge, not both")
    if args.results:
        currents = [sources.load_source(p) for p in args.results]
        baselines = _baselines(args.baseline, [(c.kind, c.profile, c.mode, c.device_class) for c in currents])
        notes = sources.pair(baselines, currents)
        checks = verdicts.not_remeasured(verdicts.evaluate(rules, baselines, currents), "--results")
    else:
        names = _suites(args.suites, rules)
        device = args.device or env.best_device()
        mode = training_modes.from_args(args).check(device)
        cls = sources.device_class(device, env.device_name(device))
        planned = [(kind, profile, m, cls) for kind, profile, m in _planned_sources(names, args.profile, device, mode)]
        baselines = _baselines(args.baseline, planned)
        threads, notes = _threads(args, baselines)
        currents = measure(names, args.profile, device, threads, args.out, mode)
        notes += sources.pair(baselines, currents)
        checks = verdicts.evaluate(rules, baselines, currents)
        again = sorted(verdicts.needs_remeasure(checks))
        if again and args.no_retry:
            checks = verdicts.not_remeasured(checks, "--no-retry")
        elif again:
            session.console.print(f"[yellow]timing rules failed in {', '.join(again)}: re-measuring once[/yellow]")
            checks = verdicts.remeasured(checks, measure(again, args.profile, device, threads, args.out, mode))
    report.print_tables([verdicts.table(checks, rules, currents, notes)], session.console)
    status = verdicts.exit_status(checks)
    failed = [v.metric for v in checks if v.failed]
    session.console.print("[green]gate passed[/green]" if status == 0 else
                      f"[bold red]gate failed[/bold red]: {len(failed)} of {len(checks)} checks: {', '.join(failed)}")
    return status


def _baselines(given: list[Path] | None, wanted: list[tuple[str, str, training_modes.Mode, str]]) -> list[Source]:
    if given:
        return [sources.load_source(p) for p in given]
    loaded = []
    for kind, profile, mode, cls in dict.fromkeys(wanted):
        path = sources.baseline_path(BASELINES, kind, cls, profile, mode)
        if not path.exists():
            what = "micro-benchmark baseline" if kind == pytest_suites.SCHEMA else f"baseline for profile {profile!r}"
            raise sources.GateError(f"no {what} for device class {cls!r} in mode {mode.label}: {path} does not exist; "
                                    f"make it with `python -m bench baseline --profile {profile}{mode.flags}` or pass --baseline FILE")
        loaded.append(sources.load_source(path))
    return loaded


def baseline_command(args: argparse.Namespace) -> int:
    device = args.device or env.best_device()
    guarded = _suites(args.suites, thresholds.load(THRESHOLDS))
    names = [n for n in guarded if not (args.skip_micro and n in pytest_suites.registry())]
    measured = measure(names, args.profile, device, args.threads, args.out, training_modes.from_args(args).check(device))
    failed = [f"{s.path}: {case} {why}" for s in measured for case, why in s.absent.items() if not why.startswith("skipped")]
    if failed:
        session.console.print("[red]no baseline written: cases failed[/red]\n  " + "\n  ".join(failed))
        return 1
    for source in measured:
        target = sources.baseline_path(args.folder, source.kind, source.device_class, source.profile, source.mode)
        if args.counts_only:
            _refresh_counts(target, Path(source.path))
            continue
        files.write_atomic(target, Path(source.path).read_bytes())
        markdown = Path(source.path).with_suffix(".md")
        if markdown.exists():
            files.write_atomic(target.with_suffix(".md"), markdown.read_bytes())
        session.console.print(f"baseline written: {target} (from {source.path})")
    session.console.print("review the tables above, then commit the baseline files with a note in docs/calibration.md")
    return 0


def _refresh_counts(target: Path, measured: Path) -> None:
    text, changes = refresh.refresh_counts(target, measured)
    files.write_atomic(target, text)
    if results.is_results_file(json.loads(text)):  # its Markdown report again, from the refreshed file
        run = results.load(target)
        suites = {name: load_suite(session.suite_registry(), name) for name in run.suites}
        heading = f"cbn-bench baseline {target.stem} (counts refreshed from {measured.name})"
        files.write_atomic(target.with_suffix(".md"), report.markdown(session.tables(run, suites), heading,
                                                                        session.preamble(run)))
    listed = "\n  ".join(changes) or "none changed"
    session.console.print(f"baseline counts refreshed: {target} (from {measured}; timings kept)\n  {listed}")


def spread_command(args: argparse.Namespace) -> int:
    files = [sources.load_source(p) for p in args.files]
    if len(files) < 2:
        raise ValueError("give at least two files of repeated identical runs")
    for source in files[1:]:
        sources.check_comparable(files[0], source)
    report.print_tables([verdicts.spread_table(files)], session.console)
    return 0
