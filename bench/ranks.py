"""A case on several processes: how the runner launches its group, how the group's ranks share
the runner's commands, and how their replies reduce to one.

``python -m bench --nproc N`` has the runner start each case as ``torch.distributed.run
--standalone --nproc-per-node N -m bench.worker`` (``launch_command``): torchrun starts the ranks,
gives them their rendezvous, and stops the whole group when one rank fails. Rank 0 alone talks to
the runner over the worker's JSON-lines pipe; it relays each command to the other ranks through a
gloo group (``relay``), every rank runs it, and rank 0 gathers the replies (``gather``) and
reduces them:

* memory, peaks and counted bytes alike, is the largest rank's, what each device must hold;
* other counts (FLOPs) are per rank: the value is the ranks' mean (equal when every rank does
  the same work);
* each rank's own value is kept beside the reduced one (``Metric.per_rank``);
* timings: each sample is the slowest rank's for that step, what a synchronized job waits for;
  each rank's samples come back too, so the runner keeps each rank's median.

The default process group carries the case's timeout, so a collective that waits for a dead or
stuck rank raises instead of hanging; the runner's own timeout on each phase kills the group's
process tree. The command group waits longer: between two commands of one case the runner may
be timing the other cases of its group.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist

from bench.metrics import Metric, timing

COMMAND_WAIT = timedelta(days=1)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def check_nproc(nproc: int, device: str) -> None:
    """A ValueError naming the fix when nproc processes cannot run on this machine's device."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give at least 1 process per case")
    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} on CUDA needs {nproc} GPUs (NCCL places one rank per GPU) and torch sees "
                         f"{torch.cuda.device_count()}; lower --nproc, or run the gloo path with --device cpu")


def threads_per_rank(nproc: int) -> int:
    """torch CPU threads for each of nproc ranks: this machine's share (torchrun's default is 1)."""
    return max(1, torch.get_num_threads() // nproc)


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The machines a run's cases span: this one alone (torchrun's --standalone rendezvous), or
    ``count`` machines that each run ``python -m bench`` with the same arguments and their own
    ``rank``, meeting through torchrun's static rendezvous at master_addr. Node 0 hosts rank 0,
    drives the run and writes the results; the others run their share of each case's group. The
    cases of a group are up at once, so case i of a group meets at master_port + i."""

    count: int = 1
    rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    def check(self) -> Nodes:
        if self.count < 1 or not 0 <= self.rank < self.count:
            raise ValueError(f"--nnodes {self.count} --node-rank {self.rank}: give each of the nodes a rank from 0 to "
                             "nnodes - 1, node 0 on the machine that writes the results")
        if self.count > 1 and not self.master_addr:
            raise ValueError("--nnodes above 1 needs --master-addr: the address of node 0, reachable from every node")
        return self

    def rendezvous(self, slot: int) -> list[str]:
        """torchrun's rendezvous options for the group's case number ``slot``."""
        if self.count == 1:
            return ["--standalone"]
        return ["--nnodes", str(self.count), "--node-rank", str(self.rank), "--master-addr", str(self.master_addr),
                "--master-port", str(self.master_port + slot)]


def launch_command(python: str, nproc: int, backend: str, timeout_s: float, rendezvous: list[str]) -> list[str]:
    """The command that starts this node's nproc worker processes of one case's group."""
    return [python, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc),
            "-m", "bench.worker", "--backend", backend, "--timeout-s", str(timeout_s)]


@dataclasses.dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    commands: dist.ProcessGroup


def join(backend: str, timeout_s: float) -> Group:
    """This process's place in its case's group (in a worker started by launch_command)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    commands = dist.new_group(backend="gloo", timeout=COMMAND_WAIT)
    assert isinstance(commands, dist.ProcessGroup)  # every rank is a member
    return Group(dist.get_rank(), dist.get_world_size(), commands)


def leave() -> None:
    """The end of a case's group (every rank, after the runner's last command)."""
    dist.destroy_process_group()


def relay(group: Group, message: object) -> object:
    """Rank 0's message, on every rank (the others pass None)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group.commands)
    return box[0]


def gather(group: Group, reply: object) -> list | None:
    """Every rank's reply, by rank, on rank 0; None on the others."""
    out: list[object] | None = [None] * group.world_size if group.rank == 0 else None
    dist.gather_object(reply, out, dst=0, group=group.commands)
    return out


def rank() -> int:
    """This process's rank in its case's group (0 when the case runs in one process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---------------------------------------------------------------------- reductions (on rank 0)
def reduce_metric(per_rank: list[Metric]) -> Metric:
    values = tuple(m.value for m in per_rank)
    first = per_rank[0]
    if first.timing:
        return timing(slowest([list(m.samples) for m in per_rank]), per_rank=values)
    # Memory (a peak, or counted bytes) is the fullest device's; other counts (FLOPs) the mean.
    value = max(values) if first.kind == "peak" or first.unit == "byte" else sum(values) / len(values)
    return dataclasses.replace(first, value=value, per_rank=values)


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Per step, the slowest rank's sample."""
    return [max(step) for step in zip(*per_rank, strict=True)]


def reduce_measured(replies: list[dict]) -> dict:
    """The ranks' replies to ``measure`` as one: metrics reduced, the first failure, every rank's notes."""
    first = replies[0]
    shared = [name for name in first["metrics"] if all(name in r["metrics"] for r in replies)]
    metrics = {name: reduce_metric([Metric.from_json(r["metrics"][name]) for r in replies]).to_json() for name in shared}
    notes = list(first["notes"])
    for i, reply in enumerate(replies[1:], start=1):
        notes += [f"rank {i}: {note}" for note in reply["notes"] if note not in first["notes"]]
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(replies) if r["error"]]
    status = "skipped" if any(r["status"] == "skipped" for r in replies) else first["status"]
    missing = {name: why for r in reversed(replies) for name, why in r.get("missing", {}).items()}
    # work: rank 0's digests (each rank computes on its own images, so theirs differ by design)
    reduced = {**first, "metrics": metrics, "notes": notes, "status": status, "error": "; ".join(errors) or None,
               "missing": missing}
    for key in ("cuda_peak_reserved_bytes", "cuda_total_bytes"):  # the runner's cache policy: the fullest device
        if first.get(key) is not None:
            reduced[key] = max(r[key] for r in replies)
    return reduced


def reduce_round(replies: list[dict]) -> dict:
    """The ranks' replies to ``round``: the slowest rank's samples, and each rank's."""
    names = replies[0]["samples"]
    return {"samples": {name: slowest([r["samples"][name] for r in replies]) for name in names},
            "rank_samples": {name: [r["samples"][name] for r in replies] for name in names}}


def reduce_reply(kind: str, replies: list[dict]) -> dict:
    """The ranks' replies (bench/protocol.py's fields, as dicts) of one kind as one."""
    if kind == "Measured":
        return reduce_measured(replies)
    if kind == "Timed":
        return reduce_round(replies)
    return replies[0]


def rank_medians(per_rank: list[list[float]]) -> tuple[float, ...]:
    return tuple(statistics.median(samples) for samples in per_rank)
