"""One benchmark case in its own process, driven by the runner over a JSON-lines pipe.

The runner writes commands (``measure``, ``warmup``, ``round``, ``exit``) to stdin and reads one
JSON reply per command from the original stdout; everything the case prints goes to stderr, so
the protocol cannot be corrupted. An exception becomes an error reply, and the process exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import traceback

import torch

from bench.suite import Case


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the case's own prints, C-level ones too, go to stderr
    sys.stdout = sys.stderr

    def reply(**message) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        start = json.loads(sys.stdin.readline())
        case = Case(**start["case"])
        _apply_limits(case, start)
        import importlib

        suite = importlib.import_module(start["suite_module"])
        workload = suite.build(case, start["device"])
        reply(event="ready")
        for line in sys.stdin:
            command = json.loads(line)["command"]
            if command == "exit":
                break
            reply(event="done", **_run(workload, command, start["device"]))
    except BaseException as err:  # reported to the runner: the suite goes on without this case
        reply(event="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        return 1
    return 0


def _run(workload, command: str, device: str) -> dict:
    if command == "measure":
        result = dataclasses.asdict(workload.measure())
    elif command == "warmup":
        workload.warmup()
        result = {}
    elif command == "round":
        result = {"samples": workload.timed_round()}
    else:
        raise ValueError(f"unknown worker command {command!r}")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # idle workers of the group must not sit on cached memory
    return result


def _apply_limits(case: Case, start: dict) -> None:
    torch.manual_seed(0)
    if start.get("threads"):
        torch.set_num_threads(int(start["threads"]))
    if case.memory_limit_bytes:
        if start["device"].startswith("cuda"):
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, case.memory_limit_bytes / total))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (case.memory_limit_bytes, case.memory_limit_bytes))


if __name__ == "__main__":
    sys.exit(main())
