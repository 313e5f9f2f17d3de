"""Run cases, each in its own worker process, timing the cases of a group interleaved.

Per group: start a worker per case (it builds its model), take each one's untimed measurement
(memory, FLOPs) one at a time, warm each up, then time round by round, A B C, B C A, C A B, ...,
so drift of the machine spreads over all configs alike and no case always runs first
(bench/sampling.py says how each round's samples are taken). A worker that fails, times out or
dies is recorded as that case's error and the others go on; Ctrl-C keeps every sample taken.
A case with nproc > 1 is a group of worker processes launched by torchrun (bench/ranks.py),
which stays up from its build to its last round, as a one-process worker does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cuda_math, protocol, ranks, sampling
from bench.metrics import Metric, timing
from bench.results import CaseResult, result_of
from bench.suite import Case, encode_case

ROOT = Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
    pass


def _metrics(reply: protocol.Measured | protocol.Warmed) -> dict[str, Metric]:
    return {name: Metric.from_json(m) for name, m in reply.metrics.items()}


class WorkerProcess:
    """A `python -m bench.worker` process holding one built case, or, for a case with nproc > 1,
    the torchrun that holds its group of workers (rank 0 speaks for them)."""

    def __init__(self, case: Case, suite_module: str, device: str, threads: int | None,
                 known_counts: dict | None = None, nodes: ranks.Nodes = ranks.Nodes(), slot: int = 0) -> None:
        self.case = case
        self._stderr = tempfile.TemporaryFile(mode="w+")
        command = worker_command(case, device, nodes, slot)
        self._torchrun = "torch.distributed.run" in command
        # Its own session: a timeout kills the whole tree (kill_tree).
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, env=worker_env(), start_new_session=True)
        self._send(protocol.Start(encode_case(case), suite_module, device, threads, cuda_math.DEFAULT.to_dict(),
                                  known_counts))
        self._receive(case.timeout_s)

    def request(self, message: protocol.Request) -> Any:
        """The worker's reply to message (a protocol.Reply other than Failed, which raises WorkerError)."""
        self._send(message)
        return self._receive(self.case.timeout_s)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send(protocol.Exit())
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, WorkerError):
                self._kill()
        self._stderr.close()

    def _kill(self) -> None:
        kill_tree(self._proc, self._torchrun)

    def _send(self, message: protocol.Request) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None  # both are pipes
        try:
            self._proc.stdin.write(protocol.encode(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._death_note()) from None

    def _receive(self, timeout_s: float) -> Any:
        assert self._proc.stdout is not None  # a pipe
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            self._kill()
            raise WorkerError(f"timed out after {timeout_s:.0f} s; killed. {self._stderr_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerError(self._death_note())
        reply = protocol.decode(line)
        if isinstance(reply, protocol.Failed):
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            group_log = f"\n{self._stderr_tail()}" if self.case.nproc > 1 else ""  # torchrun names the failed rank
            raise WorkerError(f"{reply.error}\n{reply.traceback}{group_log}")
        return reply

    def _death_note(self) -> str:
        code = self._proc.wait()
        why = " (killed by the OS: out of memory?)" if code in (-9, 137) else ""
        return f"worker exited with code {code}{why}. {self._stderr_tail()}"

    def _stderr_tail(self, chars: int = 4000) -> str:
        self._stderr.seek(0)
        tail = self._stderr.read()[-chars:].strip()
        return f"stderr tail:\n{tail}" if tail else "no stderr output"


def kill_tree(proc: subprocess.Popen, torchrun: bool) -> None:
    """Kill a worker started in a session of its own, or torchrun and its ranks. torchrun starts
    each rank in a session of its own, out of reach of a signal to torchrun's group, so it is
    asked first (SIGTERM: it stops its ranks, SIGKILL after 30 s) and killed if it does not end."""
    if torchrun:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def worker_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def worker_command(case: Case, device: str, nodes: ranks.Nodes, slot: int) -> list[str]:
    """One worker process, or this node's share of a case's group through torchrun (slot: the
    case's index in its group, which picks its rendezvous port on several nodes; bench/ranks.py)."""
    if case.nproc == 1 and nodes.count == 1:
        return [sys.executable, "-m", "bench.worker"]
    return ranks.launch_command(sys.executable, case.nproc, ranks.backend_for(device), case.timeout_s,
                                nodes.rendezvous(slot))


def groups_of(cases: list[Case]) -> list[list[Case]]:
    """The cases timed together, in run order (every node of a multi-node run forms the same)."""
    groups: dict[tuple[str, str], list[Case]] = defaultdict(list)
    for case in cases:
        groups[(case.suite, case.group or case.name)].append(case)
    return list(groups.values())


@dataclasses.dataclass
class ProgressHook:
    """How the runner reports progress: a phase description and a step count."""

    describe: Callable[[str], None] = lambda text: None
    advance: Callable[[], None] = lambda: None


def steps(case: Case) -> int:
    return 3 + case.rounds  # build, measure, warm-up, rounds


def run_cases(cases: list[Case], suite_modules: dict[str, str], device: str, threads: int | None = None,
              hook: ProgressHook | None = None, known_counts: dict[tuple[str, str], dict] | None = None,
              on_group: Callable[[list[CaseResult]], None] = lambda results: None,
              nodes: ranks.Nodes = ranks.Nodes()) -> tuple[list[CaseResult], bool]:
    """All cases' results in their order, and whether the run was interrupted (Ctrl-C).

    known_counts: (suite, case) -> a stored counts entry (bench/counts.py) the case may reuse;
    on_group gets each group's results as soon as the group is done (bench/journal.py); nodes:
    the machines the cases span, this one node 0 (bench/ranks.py)."""
    hook = hook or ProgressHook()
    results: dict[tuple[str, str], CaseResult] = {}
    interrupted = False
    try:
        for group in groups_of(cases):
            _GroupRun(group, suite_modules, device, threads, hook, results, known_counts or {}, nodes).run()
            on_group([results[(c.suite, c.name)] for c in group])
    except KeyboardInterrupt:
        interrupted = True
    ordered = []
    for case in cases:
        default = result_of(case, "interrupted", "run interrupted before this case finished")
        ordered.append(results.get((case.suite, case.name), default))
    return ordered, interrupted


class _GroupRun:
    def __init__(self, group, suite_modules, device, threads, hook, results, known_counts, nodes=ranks.Nodes()) -> None:
        self.group, self.suite_modules, self.device, self.threads = group, suite_modules, device, threads
        self.known_counts, self.nodes = known_counts, nodes
        self.hook, self.results = hook, results
        self.workers: dict[str, WorkerProcess] = {}
        self.measured: dict[str, protocol.Measured] = {}
        self.warmed: dict[str, protocol.Warmed] = {}  # a compiling workload's census
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.sample_rounds: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        self.rank_samples: dict[str, dict[str, list[list[float]]]] = defaultdict(dict)  # nproc > 1: each rank's
        self.sampling = {c.name: sampling.for_device(device, c.kept_per_round) for c in group}
        self.empty_cache = True

    def run(self) -> None:
        try:
            for case in self.group:
                self._step(case, "building", functools.partial(self._start, case))
            for case in self._live():
                self._step(case, "measuring (the untimed pass)", functools.partial(self._measure, case))
            self._decide_cache_policy()  # from the measured peaks, before warm-up grows the caches
            for case in self._live():
                self._step(case, "warming up", functools.partial(self._warmup, case))
            for r in range(max(c.rounds for c in self.group)):
                for case in sampling.rotated(self._live(), r):
                    if r < case.rounds:
                        self._step(case, f"timing round {r + 1}/{case.rounds}", functools.partial(self._round, case, r))
            for case in self._live():
                self._finish(case)
            check_identical_work(self.group, self.results)
        finally:
            for case in list(self.workers):
                self._drop(case)
            for case in self.group:  # keep what an interrupted group had measured
                key = (case.suite, case.name)
                if key not in self.results and case.name in self.measured:
                    self._finish(case, status="interrupted", error="run interrupted during timing")

    def _live(self) -> list[Case]:
        return [c for c in self.group if c.name in self.workers]

    def _step(self, case: Case, phase: str, action: Callable[[], object]) -> None:
        self.hook.describe(f"{case.suite}/{case.name}: {phase}")
        try:
            action()
        except WorkerError as err:
            self._drop(case.name)
            measured = self.measured.get(case.name)
            self.results[(case.suite, case.name)] = result_of(case, "error", str(err),
                                                              notes=list(measured.notes) if measured else [])
        self.hook.advance()

    def _start(self, case: Case) -> None:
        self.workers[case.name] = WorkerProcess(case, self.suite_modules[case.suite], self.device, self.threads,
                                         self.known_counts.get((case.suite, case.name)), self.nodes,
                                         self.group.index(case))

    def _measure(self, case: Case) -> None:
        reply: protocol.Measured = self.workers[case.name].request(protocol.Measure())
        self.measured[case.name] = reply
        if reply.status == "skipped" or reply.error:
            status = "skipped" if reply.status == "skipped" else "error"
            self._drop(case.name)
            self.results[(case.suite, case.name)] = result_of(
                case, status, reply.error, metrics=_metrics(reply), notes=list(reply.notes), missing=dict(reply.missing),
                work=dict(reply.work))
            for _ in range(case.rounds + 1):  # its warm-up and rounds will not run
                self.hook.advance()

    def _decide_cache_policy(self) -> None:
        """On CUDA: keep the workers' caches warm between rounds if they fit on the device together."""
        if not self.device.startswith("cuda"):
            self.empty_cache = False
            return
        live = self._live()
        peaks = [self.measured[c.name].cuda_peak_reserved_bytes or 0 for c in live]
        total = max((self.measured[c.name].cuda_total_bytes or 0 for c in live), default=0)
        keep, why = sampling.cache_policy(peaks, total)
        self.empty_cache = not keep
        self.sampling = {name: dataclasses.replace(s, cuda_cache=why) for name, s in self.sampling.items()}

    def _warmup(self, case: Case) -> None:
        self.warmed[case.name] = self.workers[case.name].request(protocol.Warmup(self.empty_cache))

    def _round(self, case: Case, round_index: int) -> None:
        how = self.sampling[case.name]
        reply: protocol.Timed = self.workers[case.name].request(
            protocol.Round(how.kept_per_round, how.discarded_per_round, self.empty_cache))
        for name, values in reply.samples.items():
            self.samples[case.name][name].extend(values)
            self.sample_rounds[case.name][name].extend([round_index] * len(values))
        for name, per_rank in reply.rank_samples.items():
            kept = self.rank_samples[case.name].setdefault(name, [[] for _ in per_rank])
            for rank, values in enumerate(per_rank):
                kept[rank].extend(values)

    def _finish(self, case: Case, status: str = "ok", error: str | None = None) -> None:
        measured = self.measured[case.name]
        metrics = _metrics(measured)
        if case.name in self.warmed:
            metrics.update(_metrics(self.warmed[case.name]))
        per_rank = self.rank_samples[case.name]
        rounds = self.sample_rounds[case.name]
        metrics.update({name: timing(list(values), ranks.rank_medians(per_rank[name]) if name in per_rank else (),
                                     tuple(rounds[name]))
                        for name, values in self.samples[case.name].items()})
        self.results[(case.suite, case.name)] = result_of(
            case, status, error, metrics=metrics, notes=list(measured.notes), sampling=self.sampling[case.name].to_dict(),
            missing=dict(measured.missing), work=dict(measured.work))

    def _drop(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            worker.close()


def check_identical_work(group: list[Case], results: dict[tuple[str, str], CaseResult]) -> None:
    """The finished cases of a group must have computed on the same things (CaseResult.work): a
    case whose digest of a shared key differs from the first case's becomes an error that names
    the key, so no figure is derived from a comparison of unequal work."""
    finished = [results[(c.suite, c.name)] for c in group if (c.suite, c.name) in results]
    done = [r for r in finished if r.status == "ok" and r.work]
    if len(done) < 2:
        return
    first = done[0]
    for other in done[1:]:
        differing = sorted(k for k in set(first.work) & set(other.work) if first.work[k] != other.work[k])
        if differing:
            text = "; ".join(f"{k}: {other.work[k]} here, {first.work[k]} in {first.case}" for k in differing)
            results[(other.suite, other.case)] = dataclasses.replace(
                other, status="error", error=f"did other work than {first.case}, so it cannot be compared: {text}")


def follow_node_zero(cases: list[Case], device: str, nodes: ranks.Nodes, hook: ProgressHook | None = None) -> list[str]:
    """Node rank > 0 of a run on several nodes: start this node's share of each group's cases, as
    node 0 starts its own, and wait for them to end; node 0's rank 0 relays its commands to them.
    Returns a line per case whose share here did not end cleanly (its error is in node 0's results)."""
    hook = hook or ProgressHook()
    failures = []
    for group in groups_of(cases):
        started = []
        for slot, case in enumerate(group):
            hook.describe(f"{case.suite}/{case.name}: this node's {case.nproc} processes")
            started.append((case, subprocess.Popen(worker_command(case, device, nodes, slot),
                                                   stdin=subprocess.DEVNULL, env=worker_env(), start_new_session=True)))
        for case, proc in started:
            try:
                code = proc.wait(timeout=case.timeout_s * steps(case))  # each phase within the case's timeout
            except subprocess.TimeoutExpired:
                kill_tree(proc, torchrun=True)
                code = proc.returncode
            if code != 0:
                failures.append(f"{case.suite}/{case.name}: this node's processes exited with code {code}")
            hook.advance()
    return failures
