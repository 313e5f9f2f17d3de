"""What advances a CBN layer's training iteration: the optimizer step.

A CBN layer's window moves by one iteration each time the parameters it depends on (its bound
conv's weight and bias, its own gamma and beta) are updated. Three things say so, all on the host
and outside the forward, so that a training step's graph holds no per-step decision:

* any ``torch.optim.Optimizer`` whose parameter groups hold one of those parameters: a global step
  post-hook (``register_optimizer_step_post_hook``) advances the layers it updated, once per
  ``step()``. A step that GradScaler skips (inf or nan gradients) is not taken, so it does not advance;
* in eager mode, a change of the parameters' version counters seen at a training forward
  (parameters updated by hand, ``p.sub_(lr * p.grad)``);
* ``advance(model)``, for compiled training loops that update parameters without a torch optimizer
  (a compiled forward does not look at version counters; ``model.eval()`` warns when compiled
  training ran and nothing ever advanced the layer).

Only a layer that ran a training forward since its iteration began advances: an update before any
forward (a second optimizer over the same layer, a change by hand right after the step) belongs to
the same iteration. Advancing is one in-place add per layer on the device (the iteration counter
the forward reads) and a few host-side flags; see CrossIterationBatchNorm2d's docstring for what a
forward does with them.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


class Clocked(Protocol):
    """What the clock asks of a layer (CrossIterationBatchNorm2d)."""

    current_iteration: Tensor  # on the device

    def clocked_parameters(self) -> list[Tensor]:
        """The parameters whose update is an iteration to this layer."""
        ...

    def ran_this_iteration(self) -> bool:
        """Whether a training forward ran since the current iteration began (else no update ends it)."""
        ...

    def start_next_iteration(self) -> None:
        """Host-side bookkeeping of a new iteration; the clock advances ``current_iteration`` itself."""
        ...


# Every live layer. An optimizer step looks for the layers whose parameters it holds (a few
# microseconds per layer): no parameter-to-layer map to keep right through deepcopy or rebinding.
_LAYERS: weakref.WeakSet = weakref.WeakSet()
_hook_handle: Any = None


def register(layer: Clocked) -> None:
    """Let optimizer steps advance layer (once, when it is made or unpickled)."""
    _LAYERS.add(layer)
    _install_hook()


def advance_layers(layers: list[Clocked]) -> None:
    """One iteration for each layer that ran a training forward in its current one: one fused add
    over their counters, then their host state."""
    layers = [layer for layer in layers if layer.ran_this_iteration()]
    if not layers:
        return
    with torch.no_grad():
        if len(layers) == 1:
            layers[0].current_iteration.add_(1)
        else:
            torch._foreach_add_([layer.current_iteration for layer in layers], 1)
    for layer in layers:
        layer.start_next_iteration()


def advance(model: nn.Module) -> None:
    """Advance every CBN layer in model (or model itself) by one training iteration.

    Needed only where parameters change without a torch optimizer step and the forward is compiled
    (eager forwards notice hand-written updates themselves). Call it once per step, after the update.
    """
    from cbn.layer import CrossIterationBatchNorm2d  # the layer imports this module

    advance_layers([m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)])


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    advance_layers([layer for layer in list(_LAYERS) if any(id(p) in stepped for p in layer.clocked_parameters())])


def _install_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        # torch.compiler.disable: a step compiled together with the model runs this bookkeeping
        # eagerly rather than tracing weak dictionaries.
        _hook_handle = register_optimizer_step_post_hook(torch.compiler.disable(_on_optimizer_step))
