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

from collections.abc import Iterator

import torch.distributed as dist
from torch import Tensor, nn

from cbn.layer import CrossIterationBatchNorm2d


def _per_rank_buffers(model: nn.Module) -> Iterator[tuple[str, CrossIterationBatchNorm2d, str]]:
    """(name as in ``model.state_dict()``, layer, buffer) for every CBN layer's ``per_rank_buffers``."""
    for prefix, layer in model.named_modules():
        if isinstance(layer, CrossIterationBatchNorm2d):
            for field in layer.per_rank_buffers():
                yield (f"{prefix}.{field}" if prefix else field), layer, field


def keep_statistics_per_rank(model: nn.Module) -> nn.Module:
    """Keep each process's CBN history its own under DistributedDataParallel.

    DDP (with its default broadcast_buffers=True) copies rank 0's buffers into every other rank at
    each forward, which would make every rank's window hold rank 0's past statistics; the paper
    keeps statistics per device. This lists the CBN layers' history buffers and non-finite counts
    in DDP's ignore list of ``model`` (``_ddp_params_and_buffers_to_ignore``, read when DDP wraps
    ``model``); running statistics, parameters and every other buffer are synchronized as before.
    ``cbn.convert`` calls it on the model it converts; call it on the module you wrap in DDP when
    that is not the one you converted. Returns the model.
    """
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    names = [name for name, _, _ in _per_rank_buffers(model) if name not in ignored]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + names)
    return model


def per_rank_state(model: nn.Module) -> dict[str, Tensor]:
    """This process's share: each CBN layer's history and non-finite count (``per_rank_buffers``),
    keyed as in ``model.state_dict()``, copied to the CPU."""
    return {name: getattr(layer, field).detach().cpu().clone() for name, layer, field in _per_rank_buffers(model)
            if getattr(layer, field) is not None}


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
    targets = {name: (layer, field) for name, layer, field in _per_rank_buffers(model)}
    for key, value in shares[rank].items():
        if key not in targets:
            raise ValueError(f"the checkpoint's per-rank CBN state has {key!r}, which this model lacks: "
                             "load it into the model it was saved from")
        layer, field = targets[key]
        setattr(layer, field, value.to(layer.nonfinite_batches.device).clone())  # a buffer every layer has
