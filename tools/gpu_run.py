"""The prepared GPU commands: two, each fitting a lease with room for a retry of the first.

    tools/gpu-run table6 --wheels .whl --out "$OUT"   # the layer's CUDA tests, then Table 6 (deadline 270 s)
    tools/gpu-run rest --wheels .whl --out "$OUT"     # SyncBN probe, CBN under CUDA graphs, micro and gradpath
                                                      # baselines, bf16 Table 6, profile (deadline 240 s)
    tools/gpu-run table6 --device cpu --profile smoke --out /tmp/gpu-run   # the same on a CPU, small

A lease gives 15 minutes of device time, 1-2 of them start-up: ``table6`` (deadline 270 s) plus a
retry of it plus ``rest`` (deadline 240 s) fit in what is left. Trimmed on a lent GPU: Table 6
times BN, GN, SyncBN (one process: BN's computation), CBN and the A/A control (TABLE6_CASES; Naive
CBN and the no-norm row are left out) over 8 of the paper profile's 10 rounds; ``rest`` starts each
pass after the SyncBN probe (micro-benchmark baseline, gradpath baseline, bf16 + channels_last
Table 6, the CBN-against-BN profile) only while its deadline leaves the time the pass needs (COSTS).

Everything a command makes goes under --out, in at most three files: ``gpu-run-<command>.tar.gz``
(a ``results/`` tree as the repository lays it out: runs, baselines, profiles, the log, the summary
and torch.utils.collect_env's report of the machine), ``gpu-run-<command>.log`` (everything every
step printed) and ``gpu-run-<command>.json`` (the summary: each step's command, status, exit code
and seconds, the archive's files). The archive is rewritten after every step, so a kill loses at most the step in flight; traces that
would take it past MAX_ARCHIVE_BYTES are left out and named in the summary. Unpack with
``tar -xzf gpu-run-table6.tar.gz`` at the repository root, then commit results/.

Its own deadline (--deadline-s), ahead of the device's limit, and SIGINT or SIGTERM stop the step
in flight the same way: SIGINT to the step's process group (the harness then keeps every sample
taken and writes its results file), --grace-s seconds to finish, then SIGKILL to the step and to
every worker it started (found by a run id in their environment); a journal left behind becomes a
results file through ``python -m bench recover``, and the remaining steps are skipped.

Set-up, before any step: fail fast without the device; install the carried wheels (fvcore and what
it needs, none of which the GPU image has) into a private folder, without dependencies or network;
check every import a run needs, deeply (``fvcore.nn``, not bare ``fvcore``) and torch's version;
NVML and pytest-benchmark are optional, their absence noted (no NVML figures; no micro-benchmarks).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("TMPDIR", "/tmp")) / "cbn-bench-site"
REQUIRED = ("torch", "torchvision", "fvcore.nn", "iopath", "tabulate", "rich", "matplotlib", "pytest", "scipy")
OPTIONAL = {"pynvml": "no NVML device peaks in the results (nvidia-ml-py)",
            "pytest_benchmark": "no micro-benchmarks (pytest-benchmark)"}
MIN_TORCH = (2, 4)
# 2 x 270 s (table6 and its retry) + 240 s (rest) = 780 s: a 15-minute lease less 2 minutes of start-up.
DEADLINE_S = {"table6": 270.0, "rest": 240.0}
GRACE_S = 30.0
MAX_ARCHIVE_BYTES = 15 << 20  # the lease brings back files of at most 16 MiB
TABLE6_CASES = "bn,gn,syncbn,cbn,bn_control"
TABLE6_ROUNDS = 8  # of the paper profile's 10: a t-interval of 7 degrees of freedom, about 200 s on an H100
PROFILE_STEPS = 3
RUN_ID_VARIABLE = "CBN_BENCH_GPU_RUN_ID"


@dataclass
class Step:
    name: str
    command: list[str]
    status: str = "pending"  # ok, failed, interrupted, skipped
    exit_code: int | None = None
    seconds: float = 0.0
    why: str = ""


@dataclass
class Summary:
    command: str
    device: str
    profile: str
    run_id: str
    deadline_s: float
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    stopped: str = ""  # why the command stopped early: "deadline", "SIGINT", "SIGTERM"


class Runner:
    """Runs a command's steps under its deadline, logging and packing after each."""

    def __init__(self, args: argparse.Namespace, summary: Summary) -> None:
        self.args, self.summary = args, summary
        self.out, self.work = args.out, args.work
        self.results = self.work / "results"
        self.log_path = self.out / f"gpu-run-{summary.command}.log"
        self.log = self.log_path.open("a", buffering=1)
        self.started = time.monotonic()
        self.deadline = self.started + summary.deadline_s
        self.stop: str = ""

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: Step, need_s: float = 0.0) -> None:
        self.summary.steps.append(step)
        if self.stop:
            step.status, step.why = "skipped", f"stopped by {self.stop}"
        elif self.left_s() < need_s:
            step.status, step.why = "skipped", f"{self.left_s():.0f} s left, too little (about {need_s:.0f} s)"
        if step.status == "skipped":
            self.say(f"gpu-run: skipping {step.name}: {step.why}")
            self.pack()
            return
        self.say(f"gpu-run: {step.name} ({self.left_s():.0f} s before the deadline): {' '.join(step.command)}")
        started = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{RUN_ID_VARIABLE: self.summary.run_id})
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        pump = threading.Thread(target=self._copy_output, args=(proc,), daemon=True)
        pump.start()
        while proc.poll() is None:
            if not self.stop and self.left_s() <= 0:
                self.stop = "deadline"
                self.summary.stopped = "deadline"
            if self.stop:
                self._interrupt(proc, step)
                break
            time.sleep(0.2)
        pump.join(timeout=5)
        step.exit_code, step.seconds = proc.wait(), round(time.monotonic() - started, 1)
        self.recover()  # a journal is left when the step died before writing its results file
        if step.status == "pending":
            step.status = "ok" if step.exit_code == 0 else "failed"
        self.say(f"gpu-run: {step.name}: {step.status} (exit {step.exit_code}) after {step.seconds:.0f} s")
        self.pack()

    def _copy_output(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            self.log.write(line)
        sys.stdout.flush()

    def _interrupt(self, proc: subprocess.Popen, step: Step) -> None:
        """SIGINT to the step's group, a grace period, SIGKILL; then its workers (run() recovers journals)."""
        step.status, step.why = "interrupted", f"stopped by {self.stop}"
        self.say(f"gpu-run: {self.stop}: interrupting {step.name} (SIGINT, {self.args.grace_s:.0f} s to finish)")
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=self.args.grace_s)
        except subprocess.TimeoutExpired:
            self.say(f"gpu-run: {step.name} still running after {self.args.grace_s:.0f} s: killed")
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        killed = kill_workers(self.summary.run_id)
        if killed:
            self.say(f"gpu-run: killed {len(killed)} leftover worker processes: {', '.join(map(str, killed))}")

    def recover(self) -> None:
        for journal in sorted((self.results / "runs").glob(".*.journal.jsonl")):
            self.say(f"gpu-run: recovering {journal.name}")
            done = subprocess.run([sys.executable, "-m", "bench", "recover", str(journal)], cwd=ROOT,
                                  capture_output=True, text=True)
            self.log.write(done.stdout + done.stderr)

    def pack(self) -> None:
        """The archive and the summary, rewritten atomically: results/ (traces last, dropped past
        the size limit), this log and the summary inside."""
        self.summary.left_out = []
        files = sorted(p for p in self.results.rglob("*") if p.is_file() and not p.name.startswith("."))
        traces = [p for p in files if ".trace." in p.name or p.suffix == ".pickle"]
        kept = [p for p in files if p not in traces]
        for trace in traces:
            if len(_tar(self.results, [*kept, trace], self.log_path)) <= MAX_ARCHIVE_BYTES:
                kept.append(trace)
            else:
                self.summary.left_out.append(f"results/{trace.relative_to(self.results)} (archive over "
                                             f"{MAX_ARCHIVE_BYTES >> 20} MiB)")
        self.summary.archived = [f"results/{p.relative_to(self.results)}" for p in kept]
        summary_text = json.dumps(asdict(self.summary), indent=1) + "\n"
        _write_atomic(self.out / f"gpu-run-{self.summary.command}.json", summary_text.encode())
        _write_atomic(self.out / f"gpu-run-{self.summary.command}.tar.gz",
                      _tar(self.results, kept, self.log_path, summary_text))


def _tar(root: Path, files: list[Path], log: Path, summary: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=f"results/{path.relative_to(root)}")
        tar.add(log, arcname=f"results/runs/{log.name}")
        if summary is not None:
            info = tarfile.TarInfo(f"results/runs/{log.stem}.json")
            info.size = len(summary.encode())
            tar.addfile(info, io.BytesIO(summary.encode()))
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def kill_workers(run_id: str) -> list[int]:
    """SIGKILL every process whose environment carries this run's id (the harness's workers run in
    sessions of their own, out of reach of a signal to the step's group): the pids killed."""
    marker = f"{RUN_ID_VARIABLE}={run_id}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


# ---------------------------------------------------------------------- set-up
def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-run: torch sees no CUDA device (is this the GPU machine? nvidia-smi?); "
                         "use --device cpu --profile smoke to try the script without one")


def install(wheels: Path | None) -> list[str]:
    """The carried wheels into SITE (first on sys.path and PYTHONPATH); then every import, deeply.
    Returns a note per optional package that is missing."""
    paths = [str(ROOT)]
    if wheels is not None:
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise SystemExit(f"gpu-run: no wheels in {wheels}; copy ../shared/wheels/*.whl there (docs/tools.md)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, found)], check=True)
        paths.append(str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))
    sys.path[:0] = paths
    missing = [f"{name} ({err})" for name, err in _import_errors(REQUIRED).items()]
    if missing:
        raise SystemExit("gpu-run: missing packages: " + "; ".join(missing) + ". Carry them as wheels (--wheels DIR).")
    import torch

    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if release < MIN_TORCH:
        raise SystemExit(f"gpu-run: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, "
                         "the oldest this project supports")
    return [f"{name} missing: {what}" for name, what in OPTIONAL.items() if name in _import_errors((name,))]


def _import_errors(names: tuple[str, ...]) -> dict[str, str]:
    errors = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            errors[name] = str(err)
    return errors


def record_environment(path: Path) -> None:
    """torch.utils.collect_env's report (driver, CUDA, cuDNN, packages), archived beside the results."""
    try:
        done = subprocess.run([sys.executable, "-m", "torch.utils.collect_env"], capture_output=True, text=True, timeout=120)
        path.write_text(done.stdout + done.stderr)
    except (OSError, subprocess.TimeoutExpired) as err:
        path.write_text(f"torch.utils.collect_env failed: {err}\n")


# ---------------------------------------------------------------------- the commands
def bench(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "bench", *arguments]


def table6_steps(args: argparse.Namespace, runs: Path) -> list[tuple[Step, float]]:
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layer_devices.py", "-k", "cuda"]
    run = bench("run", "table6", "--profile", args.profile, "--device", args.device, "--cases", args.cases,
                "--rounds", str(args.rounds), "--out", str(runs))
    return [(Step("layer CUDA tests", tests), 0.0), (Step("table6", run), 0.0)]


def rest_steps(args: argparse.Namespace, runs: Path, notes: list[str]) -> list[tuple[Step, float]]:
    baselines, profiles = args.work / "results" / "baselines", args.work / "results" / "profiles"
    micro = not args.skip_micro and not any(n.startswith("pytest_benchmark") for n in notes)
    where = ("--device", args.device, "--out", str(runs))
    probe = [sys.executable, str(ROOT / "tools" / "syncbn_probe.py"), "--device", args.device]
    micro_baseline = bench("baseline", "micro", *where, "--folder", str(baselines))
    gradpath = bench("baseline", "gradpath", "--skip-micro", "--profile", args.profile, *where, "--folder", str(baselines))
    mixed = bench("run", "table6", "--profile", args.profile, "--cases", args.cases, "--rounds", str(args.rounds),
                  "--precision", "bf16", "--channels-last", *where)
    profile = bench("profile", "--profile", args.profile, "--device", args.device, "--steps", str(PROFILE_STEPS),
                    "--out", str(profiles))
    cuda_graphs = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layer_devices.py",
                   "-k", "reduce_overhead"]
    costs = COSTS[args.device]
    return [(Step("syncbn probe", probe), 0.0),
            (Step("CBN under CUDA graphs", cuda_graphs), costs.cuda_graphs_s),
            *([(Step("micro baseline", micro_baseline), costs.micro_s)] if micro else []),
            (Step("gradpath baseline", gradpath), costs.gradpath_s),
            (Step("table6 in bf16 + channels_last", mixed), costs.table6_s),
            (Step("profile CBN against BN", profile), costs.profile_s)]


@dataclass(frozen=True)
class Costs:
    """Seconds a pass of ``rest`` needs, for the decision to start it (from the first H100 runs:
    gradpath's 16 cases about 190 s, the micro-benchmarks about 50 s)."""

    micro_s: float
    cuda_graphs_s: float  # inductor compiling a two-layer net, unmeasured on a GPU yet: a guess
    gradpath_s: float
    table6_s: float
    profile_s: float


COSTS = {"cuda": Costs(micro_s=60, cuda_graphs_s=90, gradpath_s=190, table6_s=150, profile_s=40),
         "cpu": Costs(micro_s=60, cuda_graphs_s=10, gradpath_s=30, table6_s=120, profile_s=40)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(DEADLINE_S), help="table6 first, then rest")
    parser.add_argument("--out", type=Path, required=True, help="where the archive, log and summary go (e.g. $OUT)")
    parser.add_argument("--work", type=Path, help="where the steps write before packing (default: a folder beside --out's "
                        "parent that is not brought back; must not be inside --out)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--profile", default="paper", help="default: paper; smoke for a quick try on a CPU")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to install first (e.g. .whl)")
    parser.add_argument("--deadline-s", type=float, help="this command's own limit (default: table6 270, rest 240)")
    parser.add_argument("--grace-s", type=float, default=GRACE_S,
                        help=f"seconds an interrupted step gets to write its results before it is killed (default {GRACE_S:.0f})")
    parser.add_argument("--skip-micro", action="store_true", help="rest: no micro-benchmarks")
    parser.add_argument("--rounds", type=int, default=TABLE6_ROUNDS, help=f"table6's timed rounds (default {TABLE6_ROUNDS})")
    parser.add_argument("--cases", default=TABLE6_CASES, help=f"table6's cases (default {TABLE6_CASES})")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.work = (args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"cbn-bench-gpu-run-{args.command}").resolve()
    if args.work == args.out or args.out in args.work.parents:
        raise SystemExit("gpu-run: --work must not be inside --out (only the packed files should come back)")
    check_device(args.device)
    notes = install(args.wheels)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.work / "results" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    summary = Summary(args.command, args.device, args.profile, uuid.uuid4().hex,
                      args.deadline_s if args.deadline_s is not None else DEADLINE_S[args.command], notes=notes)
    runner = Runner(args, summary)

    def on_signal(number: int, frame) -> None:
        runner.stop = summary.stopped = signal.Signals(number).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    runner.say(f"gpu-run {args.command} on {args.device}, profile {args.profile}, deadline {summary.deadline_s:.0f} s, "
               f"run id {summary.run_id}" + "".join(f"\n  note: {n}" for n in notes))
    record_environment(runs / f"gpu-run-{args.command}-environment.txt")
    steps = table6_steps(args, runs) if args.command == "table6" else rest_steps(args, runs, notes)
    for step, need_s in steps:
        runner.run(step, need_s)
    runner.say(f"gpu-run {args.command}: " + ", ".join(f"{s.name} {s.status}" for s in summary.steps)
               + f"; packed into {args.out}")
    runner.pack()
    if summary.stopped:
        return 130
    return 0 if all(s.status in ("ok", "skipped") for s in summary.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
