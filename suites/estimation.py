"""How well each norm's statistics estimate those of its window under the current weights, and
whether CBN's truncation of the Taylor term to the layer's own conv is justified (paper Fig. 3, 4, 6).

* ``UsedStatistics``: per norm layer, the (mean, variance) one training forward normalized with:
  the batch's for BatchNorm2d, the window's (Eq. 9-11) for CrossIterationBatchNorm2d.
* ``window_truth``: the same layers' statistics over all the window's examples under the current
  weights, every layer normalizing as it did in that step (so each layer's error is its own).
* ``relative_errors``: the mean's error in units of the true standard deviation and the variance's
  relative error, over the channels.
* ``truncation_ratios``: ||d mu^l / d theta^{l-r}||_F / ||d mu^l / d theta^l||_F (and for nu = E[x^2])
  for r = 1, 2, theta^l the conv that feeds norm layer l, layers in execution order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cbn import CrossIterationBatchNorm2d
from cbn.functional import combine

NORM_TYPES = (nn.BatchNorm2d, CrossIterationBatchNorm2d)


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, in float32 or float64."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


class UsedStatistics:
    """Forward hooks, while entered, recording per norm layer the (mean, variance) it normalized
    with in a training forward, in ``stats`` (detached), and the order the layers ran in, in
    ``order``; with inputs=True the statistics of each layer's input batch instead."""

    def __init__(self, model: nn.Module, inputs: bool = False) -> None:
        self.layers = norm_layers(model)
        self.inputs = inputs
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}
        self.order: list[str] = []
        self._handles: list = []

    def __enter__(self) -> UsedStatistics:
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            with torch.no_grad():
                mean, var = batch_statistics(args[0])
                cross = isinstance(module, CrossIterationBatchNorm2d) and module.training and not self.inputs
                past = module.past_statistics if cross else None
                if past is not None:
                    mean, var, _ = combine(mean, var, past)
            self.stats[name] = (mean, var)
            self.order.append(name)
        return hook


def window_truth(twin: nn.Module, model: nn.Module, images: Tensor,
                 used: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Each norm layer's input statistics over images (the window's examples) under model's current
    weights, with every layer normalizing as it did in the step measured (used, from
    UsedStatistics): what the layer's statistics would be if recomputed now for all the window's
    examples, the layers before it unchanged. model's state is loaded into twin, a BatchNorm2d
    version of it with the same module names, whose layers then normalize (in eval mode) with
    used; one forward of all images at once, without gradients."""
    missing = twin.load_state_dict(model.state_dict(), strict=False).missing_keys
    if missing:
        raise ValueError(f"the BatchNorm twin is missing weights of the model: {missing[:5]}")
    layers = norm_layers(twin)
    with torch.no_grad():
        for name, (mean, var) in used.items():
            layers[name].running_mean.copy_(mean)
            layers[name].running_var.copy_(var)
    twin.eval()
    with torch.no_grad(), UsedStatistics(twin, inputs=True) as seen:
        twin(images)
    return seen.stats


def relative_errors(used: tuple[Tensor, Tensor], true: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(mean error, variance error) over the channels: ||mu_used - mu_true|| / ||sigma_true|| (the
    mean's error in units of the spread it is subtracted from: a relative error of the mean itself
    would blow up for channels centred near 0) and ||var_used - var_true|| / ||var_true||."""
    (mu, var), (mu_true, var_true) = ((a.double(), b.double()) for a, b in (used, true))
    tiny = torch.finfo(torch.float64).tiny
    return (float((mu - mu_true).norm() / var_true.sum().sqrt().clamp_min(tiny)),
            float((var - var_true).norm() / var_true.norm().clamp_min(tiny)))


def conv_of_norm(model: nn.Module) -> dict[str, str]:
    """Norm layer name -> name of the conv that feeds it, from a model converted by cbn.convert."""
    names = {id(m): n for n, m in model.named_modules()}
    return {name: names[id(m.conv)] for name, m in norm_layers(model).items()
            if isinstance(m, CrossIterationBatchNorm2d) and m.conv is not None}


def truncation_ratios(twin: nn.Module, convs: dict[str, str], images: Tensor, *, probes: int | None,
                      generator: torch.Generator | None = None, distances: tuple[int, ...] = (1, 2)) -> dict[str, float]:
    """Mean over norm layers l (those with a conv r layers back in execution order that feeds l) of
    ||d s^l / d theta^{l-r}||_F / ||d s^l / d theta^l||_F, for s = mu and s = nu and each r, as
    "mu r=1", "nu r=1", ... . twin runs in training mode (BN statistics of this batch), so the
    derivatives pass through every layer's normalization.

    convs maps norm layer -> its conv (``conv_of_norm``). A Frobenius norm is estimated from
    ``probes`` random directions v (E ||J^T v||^2 = ||J||_F^2, one backward pass each, the same v
    for numerator and denominator), or computed exactly (probes=None: every unit vector)."""
    twin.train()
    inputs: dict[str, Tensor] = {}
    order: list[str] = []
    layers = {name: m for name, m in norm_layers(twin).items() if name in convs}

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name] = args[0]
            order.append(name)
        return hook

    handles = [m.register_forward_hook(keep_input(name)) for name, m in layers.items()]
    try:
        twin(images)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(twin.named_modules())
    weights = {name: modules[convs[name]].weight for name in order}
    sums: dict[str, list[float]] = {}
    for i, name in enumerate(order):
        back = {r: weights[order[i - r]] for r in distances if i - r >= 0}
        if not back:
            continue
        x = inputs[name]
        for stat, value in (("mu", x.mean((0, 2, 3))), ("nu", x.square().mean((0, 2, 3)))):
            squared = _squared_jacobian_norms(value, [weights[name], *back.values()], probes, generator)
            for r, sq in zip(back, squared[1:]):
                if sq is not None:  # None: that conv does not feed layer l (a parallel branch)
                    sums.setdefault(f"{stat} r={r}", []).append((sq / squared[0]) ** 0.5)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def _squared_jacobian_norms(value: Tensor, params: list[Tensor], probes: int | None,
                            generator: torch.Generator | None) -> list[float | None]:
    """||d value / d p||_F^2 for each p in params, exactly or from random probes; None for a p
    that value does not depend on."""
    c = value.numel()
    directions = torch.eye(c) if probes is None else torch.randn(probes, c, generator=generator)
    totals: list[float | None] = [None] * len(params)
    for v in directions.to(value.device, value.dtype):
        grads = torch.autograd.grad(value, params, v, retain_graph=True, allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                totals[j] = (totals[j] or 0.0) + float(g.double().square().sum())
    return totals
