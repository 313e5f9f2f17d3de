"""One rank of tests/test_distributed.py, run by torchrun: a converted conv + CBN net trained under
DistributedDataParallel (gloo, CPU) on rank-specific batches. Rank 0 writes what both ranks saw
as JSON to the path given as argv[1]. argv[2]: "" (train and report), "broadcast" (first remove
what cbn.convert set, to show what DDP does to the history without it), "resume" or
"resume_rank0_only" (checkpoint after STEPS steps, resume into a fresh net, and compare with the
uninterrupted run; the latter without the per-rank history)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import cbn_layers, conv_cbn_net
from torch import nn

import cbn

STEPS = 4
MORE = 3  # steps after a resume


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(100 * rank + step)) + rank  # its own data


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    outputs = []
    for step in steps:
        out = model(batch(dist.get_rank(), step))
        outputs.append(out.detach())
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return outputs


def report_window(net: nn.Module, own_means: list[torch.Tensor]) -> dict:
    first = cbn_layers(net)[0]
    slot_of = {it: s for s, it in enumerate(first.slot_iterations)}
    histories = gathered(first.history_mean)
    return {
        "iterations": [int(t) for t in gathered(torch.tensor(first.iteration))],
        "slots": [t.tolist() for t in gathered(torch.tensor(first.slot_iterations))],
        # the slot recorded at iteration STEPS-2 (its entry has been through one more forward's broadcast)
        "older_slot_equal_across_ranks": torch.equal(*(h[slot_of[STEPS - 2]] for h in histories)),
        "own_mean_error": [float(e) for e in gathered(
            (first.history_mean[slot_of[STEPS - 2]] - own_means[STEPS - 2]).abs().max())],
        "parameters_equal_across_ranks": all(torch.equal(*gathered(p.detach())) for p in net.parameters()),
    }


def resumed_difference(net: nn.Module, model: nn.Module, optimizer, path: Path, per_rank: bool) -> dict:
    """Checkpoint as rank 0 saves one, continue the run, then resume a fresh net from the checkpoint."""
    shares = cbn.gather_per_rank_state(net)
    if dist.get_rank() == 0:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "cbn": shares}, path)
    dist.barrier()
    expected = train(model, optimizer, range(STEPS, STEPS + MORE))

    checkpoint = torch.load(path, weights_only=True)
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    fresh = conv_cbn_net(window=3)
    fresh.load_state_dict(checkpoint["model"])
    if per_rank:
        cbn.load_per_rank_state(fresh, checkpoint["cbn"])
    resumed_model = nn.parallel.DistributedDataParallel(fresh)
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    got = train(resumed_model, resumed_optimizer, range(STEPS, STEPS + MORE))
    difference = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    return {"resumed_difference": [float(d) for d in gathered(torch.tensor(difference))]}


def main(path: str, variant: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    net = conv_cbn_net(window=3)
    if variant == "broadcast":
        del net._ddp_params_and_buffers_to_ignore
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    own_means = []
    cbn_layers(net)[0].conv.register_forward_hook(lambda m, a, out: own_means.append(out.detach().mean((0, 2, 3))))
    train(model, optimizer, range(STEPS))
    report = report_window(net, own_means)
    if variant.startswith("resume"):
        report |= resumed_difference(net, model, optimizer, Path(path).with_suffix(".pt"), variant == "resume")
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
