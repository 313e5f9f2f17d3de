"""Profiling a workload's steps with torch.profiler (in its worker), and reducing the events to
what a report compares: the top operators by self time and a grouped split of each step.

Every operator's self time (device time on CUDA, host time on CPU) goes to exactly one group: the
innermost CBN label around it (cbn.layer.PROFILER_LABELS), else convolutions, normalization
kernels, a group the workload names (``op_groups``: table6's detection ops, say), or the rest. So
the groups add up to the profiled total, and CBN's own work is named whatever kernels it launches.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from bench.files import write_atomic
from bench.timing import synchronize
from cbn.layer import PROFILER_LABELS

WAIT_STEPS = 1  # the profiler's schedule: skip one step, warm the profiler up on one, then record
WARMUP_STEPS = 1
TOP = 15
CONVOLUTIONS, NORMALIZATION, REST = "convolutions", "normalization kernels", "rest"
_NORM_WORDS = ("batch_norm", "group_norm", "layer_norm")
OpGroups = dict[str, tuple[str, ...]]  # group -> words, one of which an operator's name contains


def group_of(name: str, label: str | None, op_groups: OpGroups | None = None) -> str:
    """The group an operator's self time belongs to (op_groups: the workload's own, in order)."""
    if label is not None:
        return f"CBN {label.removeprefix('cbn::').replace('_', ' ')}"
    lowered = name.lower()
    if "conv" in lowered:
        return CONVOLUTIONS
    if any(word in lowered for word in _NORM_WORDS):
        return NORMALIZATION
    for group, words in (op_groups or {}).items():
        if any(word in lowered for word in words):
            return group
    return REST


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, trace: Path,
                  memory_snapshot: Path | None = None, op_groups: OpGroups | None = None) -> dict:
    """Record `steps` calls of step (after WAIT + WARMUP unrecorded ones); write a gzipped Chrome
    trace (and, on CUDA, an allocator snapshot); return the reduced summary."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1)
    if cuda and memory_snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        for _ in range(WAIT_STEPS + WARMUP_STEPS + steps):
            step()
            synchronize(device)
            prof.step()
    if cuda and memory_snapshot is not None:
        torch.cuda.memory._dump_snapshot(str(memory_snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    _export_gzipped(prof, trace)
    return summarize(prof.events(), steps, cuda, op_groups)


def _export_gzipped(prof, trace: Path) -> None:
    trace.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=trace.parent) as tmp:  # the profiler writes only to a path
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        write_atomic(trace, gzip.compress(raw.read_bytes()))


def _self_time_us(event, cuda: bool) -> float:
    if not cuda:
        return event.self_cpu_time_total
    device_time = getattr(event, "self_device_time_total", None)  # older torch: self_cuda_time_total
    return float(device_time if device_time is not None else getattr(event, "self_cuda_time_total", 0.0))


def _label(event) -> str | None:
    """The innermost CBN label around event (itself included), if any."""
    while event is not None:
        if event.name in PROFILER_LABELS:
            return event.name
        event = event.cpu_parent
    return None


def summarize(events, steps: int, cuda: bool, op_groups: OpGroups | None = None) -> dict:
    """Per step: each group's milliseconds, the top operators by self time, and the total."""
    groups: dict[str, float] = defaultdict(float)
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        self_us = _self_time_us(event, cuda)
        groups[group_of(event.name, _label(event), op_groups)] += self_us
        ops[event.name][0] += self_us
        ops[event.name][1] += 1
    per_step_ms = 1e-3 / steps
    top = sorted(ops.items(), key=lambda item: -item[1][0])[:TOP]
    return {
        "time": "device (CUDA kernels)" if cuda else "host (CPU)",
        "steps": steps,
        "total_ms": sum(groups.values()) * per_step_ms,
        "groups_ms": {name: us * per_step_ms for name, us in sorted(groups.items(), key=lambda item: -item[1])},
        "top": [{"name": name, "self_ms": us * per_step_ms, "calls": calls / steps} for name, (us, calls) in top],
    }


# ---------------------------------------------------------------------- in the runner
SCHEMA = "cbn-bench/profile"
SCHEMA_VERSION = 1


def run(cases: list, suite_module: str, device: str, kinds: list[str], steps: int, memory: bool,
        stem: Path) -> dict[str, dict[str, dict]]:
    """case name -> kind -> summary, each case profiled alone in its own worker."""
    from bench.protocol import Profile, Warmup
    from bench.runner import WorkerError, WorkerProcess

    found = {}
    for case in cases:
        worker = WorkerProcess(case, suite_module, device, None)
        try:
            worker.request(Warmup())  # CBN's window full, caches and algorithms settled
            reply = worker.request(Profile(kinds, steps, memory, f"{stem}_{case.name}"))
        except WorkerError as err:
            raise ValueError(f"profiling {case.suite}/{case.name} failed: {err}") from None
        finally:
            worker.close()
        found[case.name] = reply.profiles
    return found


def norm_work_ms(summary: dict) -> float:
    """The norm's own work in a step: CBN's labelled groups and the normalization kernels."""
    return sum(ms for group, ms in summary["groups_ms"].items() if group.startswith("CBN ") or group == NORMALIZATION)


def overhead(norm: dict, reference: dict) -> str:
    """What the norm's step costs beyond the reference's; how much of that is the norm's own work
    (the rest is the shared model work moving between runs); and the statistic gradients' share."""
    extra = norm["total_ms"] - reference["total_ms"]
    own = norm_work_ms(norm) - norm_work_ms(reference)
    line = (f"overhead = {extra:.1f} ms per step ({100 * extra / reference['total_ms']:.1f}% of the reference's step); "
            f"the norm's own work {norm_work_ms(norm):.1f} ms against {norm_work_ms(reference):.1f} ms ({own:+.1f} ms)")
    statgrad = norm["groups_ms"].get(group_of("", "cbn::statistic_gradients"), 0.0)
    if statgrad and own > 0:
        line += f", of which the statistic-gradient convolutions are {statgrad:.1f} ms ({100 * statgrad / own:.0f}%)"
    return line + f"; everything else moved {extra - own:+.1f} ms"


def tables(profiles: dict[str, dict[str, dict]], reference: str, kind: str, title: str) -> list:
    from bench.suite import Table

    names = [reference] + [n for n in profiles if n != reference]
    summaries = {n: profiles[n][kind] for n in names}
    ops = list(dict.fromkeys(op["name"] for n in names for op in summaries[n]["top"]))
    by_op = {n: {op["name"]: op for op in summaries[n]["top"]} for n in names}
    rows = []
    for op in ops:
        row = [op]
        for n in names:
            found = by_op[n].get(op)
            row += ["-", "-"] if found is None else [f"{found['self_ms']:.2f}", f"{found['calls']:.0f}"]
        rows.append(row)
    top = Table(f"{title}: top operators by self time per {kind} step ({summaries[reference]['time']})",
                ["operator"] + [f"{n} {what}" for n in names for what in ("ms", "calls")], rows,
                [f"{summaries[reference]['steps']} profiled steps; an operator outside a norm's top {TOP} shows '-'"])
    groups = list(dict.fromkeys(g for n in names for g in summaries[n]["groups_ms"]))
    group_rows = [[g] + [_share(summaries[n]["groups_ms"].get(g, 0.0), summaries[n]["total_ms"]) for n in names]
                  for g in groups]
    group_rows.append(["total"] + [f"{summaries[n]['total_ms']:.1f}" for n in names])
    caption = [f"{n}: {overhead(summaries[n], summaries[reference])}" for n in names[1:]]
    caption.append("each operator's self time goes to one group: the innermost CBN label around it (cbn.layer."
                   "PROFILER_LABELS), else its kind; the groups add up to the total")
    split = Table(f"{title}: where each {kind} step's time goes (ms per step, share)", ["group", *names],
                  group_rows, caption)
    return [top, split]


def tables_of(data: dict) -> list:
    """The report's tables from a stored profile (what `store` writes), for every kind of step in it."""
    title = f"{data['suite']} {data['profile']} on {data['environment']['device_name']}"
    kinds = list(dict.fromkeys(kind for found in data["profiles"].values() for kind in found))
    return [t for kind in kinds for t in tables(data["profiles"], data["reference"], kind, title)]


def _share(ms: float, total: float) -> str:
    return "-" if ms == 0 else f"{ms:.1f} ({100 * ms / total:.0f}%)"


def store(stem: Path, shown: list, found: dict, settings: dict, environment, notes: list[str]) -> list[Path]:
    """The report as Markdown and JSON (with every setting and the environment) beside the traces."""
    from bench import report

    preamble = [f"- command: `{environment.command}`", f"- torch {environment.torch_version}, {environment.device_name}, "
                f"threads {environment.threads}", *[f"- {note}" for note in notes]]
    markdown, summary = stem.with_suffix(".md"), stem.with_suffix(".json")
    write_atomic(markdown, report.markdown(shown, f"cbn-bench profile {stem.name}", preamble))
    data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **settings,
            "environment": dataclasses.asdict(environment), "profiles": found}
    write_atomic(summary, json.dumps(data, indent=1) + "\n")
    return [markdown, summary, *[Path(s["trace"]) for kinds in found.values() for s in kinds.values()]]
