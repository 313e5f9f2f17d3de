"""The one prepared GPU command: Table 6 at the paper's size, the statistic-gradient paths up to
C=512 and the layer micro-benchmarks on one CUDA device, stored as that GPU's baseline.

    tools/gpu-run [--wheels .whl]                         # on a machine with one GPU
    tools/gpu-run --device cpu --profile smoke --dry-run  # the plan and its time estimate, anywhere

Steps: (1) fail fast if the device is missing; (2) install the carried wheels (fvcore and what it
needs, none of which the GPU image has) into a private folder, without dependencies or network,
and check that every package a run imports is there; the project itself runs from this checkout
(PYTHONPATH), so nothing else on the machine changes; (3) print the plan and its estimated time,
and refuse a plan over the budget; (4) run one steady-state CBN training step under
torch.cuda.set_sync_debug_mode("error"), which raises at any op that makes the host wait for the
device (the layer promises none), and probe whether SyncBN can be measured on one GPU
(tools/syncbn_probe.py: gloo with two processes on the device; torch's fake process group); (5) run `python -m bench baseline table6 gradpath micro` (table6
and gradpath in one run under results/runs/, then the micro-benchmarks), which writes
results/baselines/<GPU>/ when every case succeeded; (6) when the budget allows, table6 again in
bf16 autocast with channels_last (its own baseline, paper-bf16-channels_last-eager.json), then a
CBN-against-BN torch.profiler report. A run stopped by SIGINT (`timeout -s INT`) still stores every finished case.
FLOP counts come from results/counts/ when they were counted for the same settings and
torch/torchvision releases (`python -m bench counts`), so the GPU's minutes go to what only it
can measure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 9 * 60
PROFILE_STEPS = 3
NEEDED = ("torch", "torchvision", "fvcore", "rich", "pytest", "pytest_benchmark", "pynvml", "matplotlib")
SITE = Path(os.environ.get("TMPDIR", "/tmp")) / "cbn-bench-site"


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work, for the estimate."""

    worker_start_s: float  # python, torch and the CUDA context, model built
    train_step_s: float  # table6, the slowest norm
    inference_s: float
    count_s: float  # FLOP counting of one table6 case, when no stored count matches
    gradpath_case_s: float  # start, measure and warm-up of one gradpath case
    micro_s: float  # all micro-benchmarks, pytest's start included
    syncbn_probe_s: float  # tools/syncbn_probe.py: a torchrun of 2 processes and one in-process probe


COSTS = {
    # From the first H100 runs (results/runs/20261127T0122*, *0127*): table6 at 1333x800 took 206 s,
    # gradpath's 16 cases about 190 s, the micro-benchmarks about 50 s.
    "cuda": Costs(worker_start_s=10, train_step_s=0.35, inference_s=0.55, count_s=5, gradpath_case_s=12, micro_s=60,
                  syncbn_probe_s=40),
    "cpu": Costs(worker_start_s=4, train_step_s=1.0, inference_s=0.4, count_s=10, gradpath_case_s=4, micro_s=60,
                 syncbn_probe_s=15),
}


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-run: torch sees no CUDA device (is this the GPU machine? nvidia-smi?); "
                         "use --device cpu --profile smoke to try the script without one")


def install(wheels: Path | None) -> None:
    """The carried wheels into SITE (first on sys.path and PYTHONPATH); then every needed import."""
    paths = [str(ROOT)]
    if wheels is not None:
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise SystemExit(f"gpu-run: no wheels in {wheels}; copy ../shared/wheels/*.whl there (README, 'GPU run')")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, found)], check=True)
        paths.append(str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))
    sys.path[:0] = paths
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise SystemExit("gpu-run: missing packages: " + "; ".join(missing) + ". Carry them as wheels (--wheels DIR).")


def estimate(cases: list, known: set[tuple[str, str]], device: str, with_micro: bool) -> tuple[float, list[str]]:
    """Seconds the run should take, and one line per suite saying how."""
    from bench import sampling
    from suites.table6 import WINDOW

    costs = COSTS[device]
    lines, total = [f"SyncBN on one device probe: about {costs.syncbn_probe_s / 60:.1f} min"], costs.syncbn_probe_s
    table6 = [c for c in cases if c.suite == "table6"]
    discarded = sampling.for_device(device, 1).discarded_per_round
    if table6:
        per_round = sum((discarded + c.kept_per_round) * (costs.train_step_s + costs.inference_s) for c in table6)
        setup = sum(costs.worker_start_s + (WINDOW + 2 + c.params["settings"]["warmup_steps"]) * costs.train_step_s
                    + (0 if (c.suite, c.name) in known else costs.count_s) for c in table6)
        rounds = max(c.rounds for c in table6)
        seconds = setup + rounds * per_round
        lines.append(f"table6: {len(table6)} cases, {rounds} rounds of {discarded} discarded + {table6[0].kept_per_round} kept steps, "
                     f"stored counts for {sum((c.suite, c.name) in known for c in table6)}: about {seconds / 60:.1f} min")
        total += seconds
    gradpath = [c for c in cases if c.suite == "gradpath"]
    if gradpath:
        block = gradpath[0].params["settings"]["block_s"] if "settings" in gradpath[0].params else 0.2
        seconds = sum(costs.gradpath_case_s + c.rounds * (discarded + 1) * block for c in gradpath)
        lines.append(f"gradpath: {len(gradpath)} cases (one worker each), {gradpath[0].rounds} rounds: about {seconds / 60:.1f} min")
        total += seconds
    if with_micro:
        lines.append(f"micro-benchmarks: about {costs.micro_s / 60:.1f} min")
        total += costs.micro_s
    return total, lines


def profile_seconds(device: str, steps: int = PROFILE_STEPS) -> float:
    """CBN against BN under torch.profiler: two workers, the window filled, 2 unrecorded + steps."""
    from suites.table6 import WINDOW

    costs = COSTS[device]
    return 2 * (costs.worker_start_s + (WINDOW + 1 + 2 + steps) * costs.train_step_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--profile", default="paper", help="default: paper; smoke for a quick try on a CPU")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to install first (e.g. .whl)")
    parser.add_argument("--baselines", type=Path, default=Path("results") / "baselines", help="where the baseline goes")
    parser.add_argument("--out", type=Path, default=Path("results") / "runs", help="where the run goes")
    parser.add_argument("--skip-micro", action="store_true", help="no micro-benchmarks")
    parser.add_argument("--profiles", type=Path, default=Path("results") / "profiles",
                        help="where the CBN-against-BN profile goes, when time allows after the baseline")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"refuse a plan estimated above this (default {BUDGET_S})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    started = time.perf_counter()
    check_device(args.device)
    install(args.wheels)

    from bench import env, session

    plan = session.plan(["table6", "gradpath"], args.profile, args.device)
    known = set(session.known_counts(plan, env.capture(args.device)))
    seconds, lines = estimate(plan.cases, known, args.device, not args.skip_micro)
    print(f"gpu-run plan on {env.device_name(args.device)}, profile {args.profile}:", *lines, sep="\n  ")
    print(f"  estimated total: {seconds / 60:.1f} min (budget {args.budget_s / 60:.1f} min); then, if time allows, "
          f"table6 in bf16 + channels_last and a CBN-against-BN profile (about {profile_seconds(args.device) / 60:.1f} min)",
          flush=True)
    if seconds > args.budget_s:
        raise SystemExit(f"gpu-run: the plan's estimate, {seconds:.0f} s, is over the budget of {args.budget_s:.0f} s: "
                         "lower the profile's rounds or raise --budget-s")
    if args.dry_run:
        return 0
    before = _files(args.out, args.baselines, args.profiles)
    synced = sync_check(args.device)
    subprocess.run([sys.executable, str(ROOT / "tools" / "syncbn_probe.py"), "--device", args.device])  # prints its verdicts
    suites = ["table6", "gradpath"] + ([] if args.skip_micro else ["micro"])
    command = baseline_command(args, suites)
    print("running:", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    mixed_s = estimate(session.plan(["table6"], args.profile, args.device).cases, known, args.device, False)[0]
    # The training mode people use today, as its own baseline (bench/modes.py); then the profile.
    code = max(code, run_if_time_allows("table6 in bf16 + channels_last", mixed_s,
                                        baseline_command(args, ["table6"], "--precision", "bf16", "--channels-last"),
                                        args.budget_s, started))
    profile = [sys.executable, "-m", "bench", "profile", "--profile", args.profile, "--device", args.device,
               "--steps", str(PROFILE_STEPS), "--out", str(args.profiles)]
    code = max(code, run_if_time_allows("profiling CBN against BN", profile_seconds(args.device), profile,
                                        args.budget_s, started))
    written = sorted(_files(args.out, args.baselines, args.profiles) - before)
    print(f"gpu-run: exit {code} after {time.perf_counter() - started:.0f} s; wrote:", *written, sep="\n  ")
    return code if synced else max(code, 1)


def baseline_command(args: argparse.Namespace, suites: list[str], *mode_flags: str) -> list[str]:
    return [sys.executable, "-m", "bench", "baseline", *suites, "--profile", args.profile, "--device", args.device,
            *mode_flags, "--out", str(args.out), "--folder", str(args.baselines)]


def run_if_time_allows(what: str, need_s: float, command: list[str], budget_s: float, started: float) -> int:
    """Run command when the budget still has need_s seconds: its exit status, or 0 when skipped (said why)."""
    left = budget_s - (time.perf_counter() - started)
    if left < need_s:
        print(f"gpu-run: {left:.0f} s of the budget left, too little for {what} (about {need_s:.0f} s)", flush=True)
        return 0
    print(f"{left:.0f} s of the budget left: {what}:", " ".join(command), flush=True)
    return subprocess.run(command).returncode


SYNC_CHECK_SHAPE = (2, 64, 56, 56)


def sync_check(device: str) -> bool:
    """Whether one steady-state CBN training step (the micro-benchmark's conv + CBN, window full)
    runs without a host synchronization: on CUDA under set_sync_debug_mode("error"), elsewhere by
    counting the syncing ops (bench/dispatch.py). Prints the verdict."""
    import torch

    from bench.dispatch import count_dispatches
    from suites.micro import LayerStep

    step = LayerStep("cbn", SYNC_CHECK_SHAPE, torch.device(device))
    step.fill_window()
    problem = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as err:  # the first op that synchronized, with its message
            problem = str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    else:
        syncs = count_dispatches(step).host_syncs
        problem = f"{syncs} host syncs" if syncs else None
    print(f"gpu-run: sync check, one CBN training step on {device}: " + (f"FAILED: {problem}" if problem else
          "no host synchronization"), flush=True)
    return problem is None


def _files(*folders: Path) -> set[Path]:
    return {p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


if __name__ == "__main__":
    sys.exit(main())
