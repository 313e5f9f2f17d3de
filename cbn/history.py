"""A CBN layer's history: what it keeps of its k-1 past training iterations, as a ring buffer.

One slot per past iteration, slot ``t % (k-1)`` for iteration t, each holding that iteration's
batch mean and variance (C,), the gradient path's fields (statgrad.HistoryField: what compensating
them to later weights needs) and a stamp: the iteration recorded there, or EMPTY for a slot that
holds nothing usable (never written, or a batch whose statistics were not finite). Which slots are
in the current iteration's window is computed on the device from the stamps, so no Python state
decides it and a compiled step is the same graph at every iteration.

Buffers are ``history_<field>`` on the layer, allocated when the layer is built (mean, var, stamp)
and bound to its conv (the path's fields, whose shapes are the conv's); this module holds the
allocation, the slot writes, the window test, the shape check of a checkpoint and the upgrades of
older checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbn.functional import operand

EMPTY = -(2**62)  # the stamp of a slot that holds nothing usable: older than any window

STAMP = "iteration"  # history_iteration: the stamp field


def shapes(window: int, num_features: int, path_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every history field's shape, slots first: (k-1, C) statistics, (k-1, 1) stamps, the path's fields."""
    slots = window - 1
    # A stamp per slot, as a column that broadcasts over the channels (in_window's mask is one).
    out: dict[str, tuple[int, ...]] = {"mean": (slots, num_features), "var": (slots, num_features), STAMP: (slots, 1)}
    out.update({name: (slots, *shape) for name, shape in path_shapes.items()})
    return out


def empty(field_shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device) -> dict[str, Tensor]:
    """A history holding nothing: zeros, every slot stamped EMPTY."""
    return {name: torch.full(shape, EMPTY, dtype=torch.long, device=device) if name == STAMP
            else torch.zeros(shape, dtype=dtype, device=device) for name, shape in field_shapes.items()}


def stamp(iteration: Tensor, bad: Tensor) -> Tensor:
    """The stamp of a record made in iteration: the iteration, or EMPTY for a record whose
    statistics are not finite (bad, a bool)."""
    return torch.where(bad, operand(EMPTY, iteration), iteration)


def in_window(iteration: Tensor, stamps: Tensor, window: int) -> Tensor:
    """(k-1, 1) bool: the slots holding one of the iterations t-k+1 .. t-1 (t = iteration), decided
    on the device. A slot skipped by an iteration that recorded nothing keeps an older stamp and
    drops out; one recorded in iteration t itself (a checkpoint saved mid-iteration) is not past yet."""
    age = torch.sub(iteration, stamps)
    return torch.bitwise_and(age > 0, age < window)  # one dispatch, & two


def write(buffer: Tensor, slot: int | Tensor, value: Tensor) -> None:
    """buffer[slot] = value. An int slot (eager: the host knows the iteration) writes through a view;
    a tensor slot (compiled: the iteration lives on the device) is an index_copy_."""
    if isinstance(slot, int):
        buffer[slot].copy_(value)
    else:
        buffer.index_copy_(0, slot, value.reshape(1, *buffer.shape[1:]))


def misshapen(state_dict: dict, prefix: str, expected: dict[str, tuple[int, ...]], layer: str) -> list[str]:
    """One message per stored history buffer whose shape is not expected's."""
    out = []
    for field, shape in expected.items():
        stored = state_dict.get(prefix + "history_" + field)
        if stored is not None and tuple(stored.shape) != shape:
            out.append(f"{prefix}history_{field}: the checkpoint holds shape {tuple(stored.shape)}, but this layer "
                       f"({layer}) keeps {shape}; load it into a layer built and bound as the one that saved it")
    return out


def upgrade(state_dict: dict, prefix: str) -> None:
    """Convert a layer state of versions 1-3 in place to version 4's buffers.

    Versions 1-3 kept the iteration and each slot's iteration in ``_extra_state`` ([t, slots...],
    t being the last trained iteration: the next forward started t+1) and the slots' validity in
    ``history_valid`` (version 1: every filled slot was valid). Version 4 keeps the iteration the
    next forward belongs to in ``current_iteration`` and merges slot iteration and validity into the stamps.
    Versions 1 and 2 also stored each slot's linear forms at its recording weights, which equal its
    mean and twice its mean square (statgrad's docstring), so they are dropped. The efficient
    path's fields were 5-D; version 4 keeps each row of weights flat (statgrad.EfficientPath.fields)."""
    extra = state_dict.pop(prefix + "_extra_state", None)
    for field in ("history_offset_mean", "history_offset_sq"):
        state_dict.pop(prefix + field, None)
    if extra is None:  # version 4 already, or a BatchNorm2d state
        return
    for field in ("history_grad_mean", "history_grad_sq"):  # (S, G or C, C_in/g, kh, kw), now a row each
        stored = state_dict.get(prefix + field)
        if stored is not None and stored.dim() == 5:
            state_dict[prefix + field] = stored.flatten(2)
    extra = torch.as_tensor(extra, dtype=torch.long)
    state_dict[prefix + "current_iteration"] = (extra[0] + 1).clamp_min(0)
    valid = state_dict.pop(prefix + "history_valid", None)
    mean = state_dict.get(prefix + "history_mean")
    if mean is None:  # it never recorded: the layer keeps its empty history
        return
    slots = extra[1:]
    if valid is None:
        valid = slots >= 0
    stamps = torch.where(valid.cpu() & (slots >= 0), slots, torch.tensor(EMPTY))
    state_dict[prefix + "history_" + STAMP] = stamps.view(-1, 1).to(mean.device)
