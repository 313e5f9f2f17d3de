"""Small from-scratch training runs on natural images, for measuring what a norm buys in accuracy
(suites/quality.py): a VGG-style conv net, the suite's photographs as classes (suites/images.py),
SGD with momentum and a cosine learning-rate decay, held-out accuracy on unseen crops.

A run is fixed by its seed: the initial weights and the order of the training batches. Every norm
trained with one seed starts from the same weights (the BN network, converted) and sees the same
images; a run at k*m images per step sees the k consecutive m-image batches of the others as one
batch, over 1/k of the steps with k times the learning rate (the linear scaling rule), so every
run sees the same examples the same number of times.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import cbn
from suites import images

HELD_OUT_SEED = 1_000_000  # crops no training seed draws (images.batch mixes seed and step)
HELD_OUT_BATCH = 50
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
GN_GROUPS = 8  # the paper's 32 groups would leave a 16-channel layer with no group statistics


def conv_net(width: int, classes: int) -> nn.Sequential:
    """Six 3x3 conv + BatchNorm2d + ReLU layers (widths w, w, 2w, 2w, 4w, 4w, two stride-2), global
    average pooling and a linear classifier: small enough to train in seconds on a CPU, deep
    enough that each norm layer's input depends on the layers before it."""
    widths = (width, width, 2 * width, 2 * width, 4 * width, 4 * width)
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip((3, *widths), widths)):
        stride = 2 if i in (2, 4) else 1
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


@dataclass(frozen=True)
class Recipe:
    """How one network is trained: its norm, images per step, and CBN's options."""

    norm: str  # "bn", "gn", "cbn" or "naive_cbn"
    batch: int  # images per step
    steps: int
    lr: float
    window: int = 1
    burn_in: int = 0  # steps
    negative_variance: str = "clamp"
    accumulate: int = 1  # forward-backward passes per step, batch / accumulate images each (BN only)


def with_norm(bn_model: nn.Module, recipe: Recipe) -> nn.Module:
    """A copy of bn_model (same weights) with its BatchNorm2d layers replaced as the recipe says."""
    model = copy.deepcopy(bn_model)
    if recipe.norm == "bn":
        return model
    if recipe.norm == "gn":
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.GroupNorm(min(GN_GROUPS, child.num_features), child.num_features))
        return model
    return cbn.convert(model, window=recipe.window, burn_in=recipe.burn_in, compensate=recipe.norm == "cbn",
                       negative_variance=recipe.negative_variance)


@dataclass
class History:
    """What one run recorded: at each evaluation, the examples seen so far, the mean training loss
    since the previous evaluation and the held-out accuracy; then the final figures."""

    examples: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    final_loss: float = math.nan  # mean training loss over the last tenth of the steps
    negative: int = 0  # CBN: window entries whose compensated variance was negative ...
    compensated: int = 0  # ... out of those compensated
    diverged: bool = False  # a non-finite loss stopped the run


def train(bn_model: nn.Module, recipe: Recipe, *, m: int, image_px: int, seed: int, evaluations: int,
          held_out: list[tuple[Tensor, Tensor]], device: torch.device) -> History:
    """Train a copy of bn_model under recipe on seed's batches of m images (grouped into recipe.batch
    images per step); evaluate on held_out `evaluations` times, evenly over the run."""
    model = with_norm(bn_model, recipe).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    group = recipe.batch // m
    every = max(1, recipe.steps // evaluations)
    history, losses = History(), []
    for step in range(recipe.steps):
        x, y = _grouped_batch(step, group, m, image_px, seed)
        model.train()
        loss = sum(nn.functional.cross_entropy(model(xs.to(device)), ys.to(device)) / recipe.accumulate
                   for xs, ys in zip(x.chunk(recipe.accumulate), y.chunk(recipe.accumulate)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            history.diverged = True
            break
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            history.examples.append((step + 1) * recipe.batch)
            history.train_loss.append(_mean(losses[-every:]))
            history.accuracy.append(accuracy(model, held_out, device))
    tail = losses[-max(1, len(losses) // 10):]
    history.final_loss = _mean(tail)
    if history.diverged:
        history.accuracy.append(accuracy(model, held_out, device))
    counts = cbn.negative_variance_counts(model).values()
    history.negative, history.compensated = sum(n for n, _ in counts), sum(c for _, c in counts)
    return history


def _grouped_batch(step: int, group: int, m: int, image_px: int, seed: int) -> tuple[Tensor, Tensor]:
    parts = [images.batch(step * group + j, m, image_px, seed=seed) for j in range(group)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def held_out_set(count: int, image_px: int) -> list[tuple[Tensor, Tensor]]:
    """count unseen crops of the suite's photographs (another seed than any training run's)."""
    batches = -(-count // HELD_OUT_BATCH)
    return [images.batch(i, HELD_OUT_BATCH, image_px, seed=HELD_OUT_SEED) for i in range(batches)]


@torch.no_grad()
def accuracy(model: nn.Module, held_out: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Top-1 accuracy in eval mode (running statistics), as a deployed model is used."""
    model.eval()
    right = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in held_out)
    return right / sum(len(y) for _, y in held_out)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
