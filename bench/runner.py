"""Run cases, each in its own worker process, timing the cases of a group interleaved.

Per group: start a worker per case (it builds its model), take each one's untimed measurement
(memory, FLOPs) one at a time, warm each up, then time round by round, A B C, B C A, C A B, ...,
so drift of the machine spreads over all configs alike and no case always runs first
(bench/sampling.py says how each round's samples are taken). A worker that fails, times out or
dies is recorded as that case's error and the others go on; Ctrl-C keeps every sample taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench import mathmodes, sampling
from bench.results import CaseResult
from bench.metrics import Metric, timing
from bench.suite import Case

ROOT = Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
    pass


class Worker:
    """A `python -m bench.worker` process holding one built case."""

    def __init__(self, case: Case, suite_module: str, device: str, threads: int | None,
                 known_counts: dict | None = None) -> None:
        self.case = case
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
        )
        start = {"case": dataclasses.asdict(case), "suite_module": suite_module, "device": device, "threads": threads,
                 "math_modes": mathmodes.DEFAULT.to_dict(), "known_counts": known_counts}
        self._send(start)
        self._receive(case.timeout_s)

    def request(self, command: str, **options) -> dict:
        self._send({"command": command, **options})
        return self._receive(self.case.timeout_s)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send({"command": "exit"})
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, WorkerError):
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def _send(self, message: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._death_note()) from None

    def _receive(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            self._proc.kill()
            self._proc.wait()
            raise WorkerError(f"timed out after {timeout_s:.0f} s; killed. {self._stderr_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerError(self._death_note())
        reply = json.loads(line)
        if reply["event"] == "error":
            self._proc.wait(timeout=30)
            raise WorkerError(f"{reply['error']}\n{reply['traceback']}")
        return reply

    def _death_note(self) -> str:
        code = self._proc.wait()
        why = " (killed by the OS: out of memory?)" if code in (-9, 137) else ""
        return f"worker exited with code {code}{why}. {self._stderr_tail()}"

    def _stderr_tail(self, chars: int = 2000) -> str:
        self._stderr.seek(0)
        tail = self._stderr.read()[-chars:].strip()
        return f"stderr tail:\n{tail}" if tail else "no stderr output"


@dataclasses.dataclass
class ProgressHook:
    """How the runner reports progress: a phase description and a step count."""

    describe: Callable[[str], None] = lambda text: None
    advance: Callable[[], None] = lambda: None


def steps(case: Case) -> int:
    return 3 + case.rounds  # build, measure, warm-up, rounds


def run_cases(cases: list[Case], suite_modules: dict[str, str], device: str, threads: int | None = None,
              hook: ProgressHook | None = None, known_counts: dict[tuple[str, str], dict] | None = None,
              on_group: Callable[[list[CaseResult]], None] = lambda results: None) -> tuple[list[CaseResult], bool]:
    """All cases' results in their order, and whether the run was interrupted (Ctrl-C).

    known_counts: (suite, case) -> a stored counts entry (bench/counts.py) the case may reuse;
    on_group gets each group's results as soon as the group is done (bench/journal.py)."""
    hook = hook or ProgressHook()
    results: dict[tuple[str, str], CaseResult] = {}
    groups: dict[tuple[str, str], list[Case]] = defaultdict(list)
    for case in cases:
        groups[(case.suite, case.group or case.name)].append(case)
    interrupted = False
    try:
        for group in groups.values():
            _GroupRun(group, suite_modules, device, threads, hook, results, known_counts or {}).run()
            on_group([results[(c.suite, c.name)] for c in group])
    except KeyboardInterrupt:
        interrupted = True
    ordered = []
    for case in cases:
        default = CaseResult(case.suite, case.name, case.params, "interrupted", "run interrupted before this case finished")
        ordered.append(results.get((case.suite, case.name), default))
    return ordered, interrupted


class _GroupRun:
    def __init__(self, group, suite_modules, device, threads, hook, results, known_counts) -> None:
        self.group, self.suite_modules, self.device, self.threads = group, suite_modules, device, threads
        self.known_counts = known_counts
        self.hook, self.results = hook, results
        self.workers: dict[str, Worker] = {}
        self.measured: dict[str, dict] = {}
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.sampling = {c.name: sampling.for_device(device, c.kept_per_round) for c in group}
        self.empty_cache = True

    def run(self) -> None:
        try:
            for case in self.group:
                self._step(case, "building", lambda c=case: self._start(c))
            for case in self._live():
                self._step(case, "measuring (the untimed pass)", lambda c=case: self._measure(c))
            self._decide_cache_policy()  # from the measured peaks, before warm-up grows the caches
            for case in self._live():
                self._step(case, "warming up", lambda c=case: self._warmup(c))
            for r in range(max(c.rounds for c in self.group)):
                for case in sampling.rotated(self._live(), r):
                    if r < case.rounds:
                        self._step(case, f"timing round {r + 1}/{case.rounds}", lambda c=case: self._round(c))
            for case in self._live():
                self._finish(case)
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
            self.results[(case.suite, case.name)] = CaseResult(case.suite, case.name, case.params, "error", str(err),
                                                               notes=self.measured.get(case.name, {}).get("notes", []))
        self.hook.advance()

    def _start(self, case: Case) -> None:
        self.workers[case.name] = Worker(case, self.suite_modules[case.suite], self.device, self.threads,
                                         known_counts=self.known_counts.get((case.suite, case.name)))

    def _measure(self, case: Case) -> None:
        reply = self.workers[case.name].request("measure")
        reply["metrics"] = {name: Metric.from_json(m) for name, m in reply["metrics"].items()}
        self.measured[case.name] = reply
        if reply["status"] == "skipped" or reply["error"]:
            status = "skipped" if reply["status"] == "skipped" else "error"
            self._drop(case.name)
            self.results[(case.suite, case.name)] = CaseResult(
                case.suite, case.name, case.params, status, reply["error"], reply["metrics"], notes=reply["notes"])
            for _ in range(case.rounds + 1):  # its warm-up and rounds will not run
                self.hook.advance()

    def _decide_cache_policy(self) -> None:
        """On CUDA: keep the workers' caches warm between rounds if they fit on the device together."""
        if not self.device.startswith("cuda"):
            self.empty_cache = False
            return
        live = self._live()
        peaks = [int(self.measured[c.name].get("cuda_peak_reserved_bytes", 0)) for c in live]
        total = max((int(self.measured[c.name].get("cuda_total_bytes", 0)) for c in live), default=0)
        keep, why = sampling.cache_policy(peaks, total)
        self.empty_cache = not keep
        self.sampling = {name: dataclasses.replace(s, cuda_cache=why) for name, s in self.sampling.items()}

    def _warmup(self, case: Case) -> None:
        self.workers[case.name].request("warmup", empty_cache=self.empty_cache)

    def _round(self, case: Case) -> None:
        how = self.sampling[case.name]
        reply = self.workers[case.name].request("round", kept=how.kept_per_round, discarded=how.discarded_per_round,
                                                empty_cache=self.empty_cache)
        for name, values in reply["samples"].items():
            self.samples[case.name][name].extend(values)

    def _finish(self, case: Case, status: str = "ok", error: str | None = None) -> None:
        measured = self.measured[case.name]
        metrics = dict(measured["metrics"])
        metrics.update({name: timing(list(values)) for name, values in self.samples[case.name].items()})
        self.results[(case.suite, case.name)] = CaseResult(
            case.suite, case.name, case.params, status, error, metrics, list(measured["notes"]),
            sampling=self.sampling[case.name].to_dict())

    def _drop(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            worker.close()
