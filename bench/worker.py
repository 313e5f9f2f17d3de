"""One benchmark case in its own process, driven by the runner over a JSON-lines pipe.

The runner writes requests (bench/protocol.py: ``Start``, then ``Measure``, ``Warmup``, ``Round``,
``Profile``, ``Exit``) to stdin and reads one reply per request from the original stdout;
everything the case prints goes to stderr, so the protocol cannot be corrupted. An exception
becomes a ``Failed`` reply, and the process exits.

A case on several processes runs one worker per rank, started by torchrun (bench/ranks.py):
rank 0 speaks the protocol and relays each command to the other ranks, and replies with what
their replies reduce to. A rank that fails prints its error and exits; torchrun then stops the
group, and the runner records the case's error.

On CUDA the worker empties its caching allocator after ``measure`` (the next case is measured
alone), and after ``warmup`` and ``round`` only when the runner says so (bench/sampling.py): a
kept cache makes each timed step a steady-state step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import protocol, ranks
from bench.cuda_math import CudaMath
from bench.profiling import profile_steps
from bench.suite import Case, Compiles, Profiled, ReusesCounts, Workload, decode_case


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's channel
    os.dup2(2, 1)  # the case's own prints, C-level ones too, go to stderr
    sys.stdout = sys.stderr
    group = ranks.join(args.backend, args.timeout_s) if args.backend else None
    speaks = group is None or group.rank == 0  # to the runner

    def reply(message: protocol.Reply) -> None:
        if speaks:
            out.write(protocol.encode(message) + "\n")

    def next_request() -> Any:  # a protocol.Request
        request: protocol.Request | None = None
        if speaks:
            line = sys.stdin.readline()
            request = protocol.decode(line) if line else protocol.Exit()  # end of input: the runner is gone
        return request if group is None else ranks.relay(group, request)

    def all_replies(result: Any) -> Any:
        """This process's reply, or on several processes what every rank's reduces to (on rank 0)."""
        if group is None:
            return result
        replies = ranks.gather(group, dataclasses.asdict(result))
        return type(result)(**ranks.reduce_reply(type(result).__name__, replies)) if replies else result

    try:
        start = next_request()
        if not isinstance(start, protocol.Start):
            raise protocol.ProtocolError(f"expected Start, got {type(start).__name__}")
        import importlib

        suite = importlib.import_module(start.suite_module)
        case = decode_case(suite, start.case)
        _apply_limits(case, start)
        workload = suite.build(case, start.device)
        if start.known_counts and isinstance(workload, ReusesCounts):
            workload.reuse_counts(start.known_counts)  # stored device-independent counts (bench/counts.py)
        all_replies(protocol.Ready())  # every rank built its case
        reply(protocol.Ready())
        while not isinstance(request := next_request(), protocol.Exit):
            reply(all_replies(_run(workload, request, start.device)))
        if group is not None:
            ranks.leave()
    except BaseException as err:  # reported to the runner: the suite goes on without this case
        if not speaks:
            traceback.print_exc()  # torchrun stops the group when this rank exits; its stderr says why
            print(f"rank {group.rank if group else '?'} failed: {type(err).__name__}: {err}", file=sys.stderr)
        reply(protocol.Failed(f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:]))
        return 1
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description="one case's worker (started by the runner)")
    p.add_argument("--backend", help="torch.distributed backend: this process is one rank of a torchrun group")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="the process group's timeout")
    return p.parse_args(argv)


def _run(workload: Workload, request: protocol.Request, device: str) -> protocol.Reply:
    cuda = device.startswith("cuda")
    result: protocol.Reply
    if isinstance(request, protocol.Measure):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        measured = workload.measure()
        result = protocol.Measured(**{**dataclasses.asdict(measured),
                                      "metrics": {k: m.to_json() for k, m in measured.metrics.items()}})
        if cuda:  # what the runner's cache policy needs: this worker's peak and the device's size
            result = dataclasses.replace(result, cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                                         cuda_total_bytes=torch.cuda.mem_get_info()[1])
            torch.cuda.empty_cache()  # the next case is measured with the device to itself
    elif isinstance(request, protocol.Warmup):
        workload.warmup()
        census = workload.compile_census() if isinstance(workload, Compiles) else {}
        result = protocol.Warmed({k: m.to_json() for k, m in census.items()})
    elif isinstance(request, protocol.Round):
        result = protocol.Timed(workload.timed_round(request.kept, request.discarded))
    elif isinstance(request, protocol.Profile):
        result = protocol.Profiled(profiled(workload, request, torch.device(device)))
    else:
        raise protocol.ProtocolError(f"a worker takes no {type(request).__name__} here")
    if cuda and getattr(request, "empty_cache", False):
        torch.cuda.empty_cache()  # the group's workers do not fit together with warm caches
    return result


def profiled(workload: Workload, request: protocol.Profile, device: torch.device) -> dict[str, dict]:
    """Each requested kind of step (workload.profiled_steps()) under torch.profiler (bench/profiling.py)."""
    if not isinstance(workload, Profiled):
        raise ValueError(f"{type(workload).__name__} names no steps to profile (bench.suite.Profiled)")
    steps = workload.profiled_steps()
    out = {}
    for kind in request.kinds:
        if kind not in steps:
            raise ValueError(f"this workload profiles {', '.join(steps)} steps, not {kind!r}")
        trace = Path(f"{request.stem}_{kind}.trace.json.gz")
        snapshot = Path(f"{request.stem}_{kind}.memory.pickle") if request.memory and device.type == "cuda" else None
        summary = profile_steps(steps[kind], request.steps, device, trace, snapshot, workload.op_groups())
        out[kind] = {**summary, "trace": str(trace), "memory_snapshot": None if snapshot is None else str(snapshot)}
    return out


def _apply_limits(case: Case, start: protocol.Start) -> None:
    torch.manual_seed(0)
    if start.math_modes and start.device.startswith("cuda"):
        CudaMath(**start.math_modes).apply()
    if start.threads:
        torch.set_num_threads(int(start.threads))
    if case.memory_limit_bytes:
        if start.device.startswith("cuda"):
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, case.memory_limit_bytes / total))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (case.memory_limit_bytes, case.memory_limit_bytes))


if __name__ == "__main__":
    sys.exit(main())
