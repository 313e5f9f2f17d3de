"""CBN under data parallelism: each process's history is its own, in training and in checkpoints.

Under DistributedDataParallel every process keeps the statistics of its own past batches, as the
paper does per device (``cbn.keep_statistics_per_rank`` keeps DDP from overwriting them with rank
0's). A checkpoint that rank 0 saves from ``model.state_dict()`` therefore holds rank 0's history
only; loaded on every rank, it would give each rank rank 0's window. To resume exactly, save every
rank's share beside it and give each rank its own back::

    shares = cbn.gather_per_rank_state(model)           # on every rank (a collective)
    if rank == 0:
        torch.save({"model": model.state_dict(), "cbn": shares, ...}, path)
    ...
    model.load_state_dict(checkpoint["model"])          # on every rank
    cbn.load_per_rank_state(model, checkpoint["cbn"])   # then each rank's own history
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from cbn.layer import CrossIterationBatchNorm2d


def _layers(model: nn.Module) -> dict[str, CrossIterationBatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}


def per_rank_state(model: nn.Module) -> dict[str, Tensor]:
    """This process's share: each CBN layer's history and non-finite count (``per_rank_buffers``),
    keyed as in ``model.state_dict()``, copied to the CPU."""
    state = {}
    for prefix, layer in _layers(model).items():
        for field in layer.per_rank_buffers():
            value = getattr(layer, field)
            if value is not None:
                state[f"{prefix}.{field}" if prefix else field] = value.detach().cpu().clone()
    return state


def gather_per_rank_state(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[dict[str, Tensor]]:
    """Every rank's ``per_rank_state``, by rank, on every rank: a collective, call it on all ranks."""
    shares: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, per_rank_state(model), group=group)
    return shares


def load_per_rank_state(model: nn.Module, shares: list[dict[str, Tensor]], group: dist.ProcessGroup | None = None) -> None:
    """Give this rank its own share of a checkpoint's ``gather_per_rank_state``; call it after
    ``model.load_state_dict`` (which sets the iteration counters and rank 0's history)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(shares) != world:
        raise ValueError(f"the checkpoint holds the CBN history of {len(shares)} processes and this job has {world}: "
                         "resume with the world size it was saved with, or leave out load_per_rank_state (every rank "
                         "then starts from rank 0's history, which the window replaces within window - 1 steps)")
    layers = _layers(model)
    for key, value in shares[rank].items():
        prefix, _, field = key.rpartition(".")
        layer = layers.get(prefix)
        if layer is None or field not in layer.per_rank_buffers():
            raise ValueError(f"the checkpoint's per-rank CBN state has {key!r}, which this model lacks: "
                             "load it into the model it was saved from")
        setattr(layer, field, value.to(layer.nonfinite_batches.device).clone())  # a buffer every layer has
