"""One rank of tests/test_distributed.py, run by torchrun: a converted conv + CBN net trained under
DistributedDataParallel (gloo, CPU) on rank-specific batches. Rank 0 writes what both ranks saw
as JSON to the path given as argv[1]; argv[2] == "broadcast" first removes what cbn.convert set,
to show what DDP does to the history without it."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from helpers import cbn_layers, conv_cbn_net

STEPS = 4


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def main(path: str, variant: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    net = conv_cbn_net(window=3)
    if variant == "broadcast":
        del net._ddp_params_and_buffers_to_ignore
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = cbn_layers(net)[0]
    own_means = []
    first.conv.register_forward_hook(lambda m, a, out: own_means.append(out.detach().mean((0, 2, 3))))
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(2, 3, 10, 10, generator=gen) + rank  # each rank its own data
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    slot_of = {it: s for s, it in enumerate(first._slot_iterations)}
    histories = gathered(first.history_mean)
    report = {
        "iterations": [int(t) for t in gathered(torch.tensor(first.iteration))],
        "slots": [t.tolist() for t in gathered(torch.tensor(first._slot_iterations))],
        # the slot recorded at iteration STEPS-2 (its entry has been through one more forward's broadcast)
        "older_slot_equal_across_ranks": torch.equal(*(h[slot_of[STEPS - 2]] for h in histories)),
        "own_mean_error": [float(e) for e in gathered(
            (first.history_mean[slot_of[STEPS - 2]] - own_means[STEPS - 2]).abs().max())],
        "parameters_equal_across_ranks": all(torch.equal(*gathered(p.detach())) for p in net.parameters()),
    }
    if rank == 0:
        with open(path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
