"""Can SyncBN be measured on a machine with one GPU? Two probes, one verdict line each (issue 9;
tools/gpu-run runs this first on a lent GPU):

* gloo: two processes (torchrun) with the gloo backend, both on the one device, since NCCL places
  one rank per GPU. Does SyncBatchNorm run forward and backward there, and is its output that of
  BatchNorm2d over both ranks' batches together?
* fake: one process in torch's fake process group at world size 2, which runs SyncBatchNorm's
  compute with no communication (its collectives return without data, so only the cost could
  mean anything, as "compute only").

    python tools/syncbn_probe.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHAPE = (2, 8, 6, 6)  # one rank's batch


def batch(rank: int, device: str) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(rank)).to(device)


def sync_bn_step(device: str, rank: int) -> torch.Tensor:
    norm = nn.SyncBatchNorm(SHAPE[1]).to(device)
    out = norm(batch(rank, device))
    out.square().sum().backward()
    return out.detach()


def gloo_rank(device: str, report: Path) -> None:
    """One of the two ranks of the gloo probe (run by torchrun)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        out = sync_bn_step(device, rank).cpu()
        outs = [torch.zeros_like(out) for _ in range(2)]
        dist.all_gather(outs, out)
        both = torch.cat([batch(0, "cpu"), batch(1, "cpu")])
        expected = nn.BatchNorm2d(SHAPE[1])(both).detach()
        verdict = {"ok": True, "max_difference_to_bn": float((torch.cat(outs) - expected).abs().max())}
    except Exception as err:  # the verdict is the finding
        verdict = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    if rank == 0:
        report.write_text(json.dumps(verdict))
    dist.destroy_process_group()


def gloo_probe(device: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "gloo.json"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               __file__, "--gloo-rank", "--device", device, "--report", str(report)],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if not report.exists():
            return f"did not finish (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        verdict = json.loads(report.read_text())
    if not verdict["ok"]:
        return f"fails: {verdict['error']}"
    return f"runs; output vs BatchNorm2d over both batches: max difference {verdict['max_difference_to_bn']:.2e}"


def fake_probe(device: str) -> str:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        out = sync_bn_step(device, 0)
        return f"runs (compute only, no communication; output finite: {bool(torch.isfinite(out).all())})"
    except Exception as err:  # the verdict is the finding
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0]}"
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gloo-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gloo_rank:
        gloo_rank(args.device, args.report)
        return 0
    print(f"syncbn probe: gloo, 2 processes on one {args.device} device: {gloo_probe(args.device)}", flush=True)
    print(f"syncbn probe: fake process group, world size 2, on {args.device}: {fake_probe(args.device)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
