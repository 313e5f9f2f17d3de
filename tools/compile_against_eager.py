"""A ResNet-18 training step (4 x 224 px, classify quick's shape), eager against inductor-compiled, for
BN and CBN k=4, with a second eager BN as the A/A control: interleaved rounds in one process, 2
threads. What the classify suite cannot show, since it runs one mode per run. ``--model stem``
times ResNet's stem alone (conv 7x7, norm, ReLU, max-pool) and one 3x3 conv, where compiled CBN
loses most against eager (docs/results.md).

    python tools/compile_against_eager.py [--rounds 12] [--model stem]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cbn  # noqa: E402

VARIANTS = {"bn eager": ("bn", False), "bn eager A/A": ("bn", False), "bn compiled": ("bn", True),
            "cbn eager": ("cbn", False), "cbn compiled": ("cbn", True)}
RATIOS = (("bn eager A/A", "bn eager"), ("bn compiled", "bn eager"), ("cbn compiled", "cbn eager"),
          ("cbn eager", "bn eager"), ("cbn compiled", "bn compiled"))


def stem() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64),
                               torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(3, 2, 1),
                               torch.nn.Conv2d(64, 64, 3, 1, 1, bias=False))


def training_step(norm: str, compiled: bool, model_name: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = stem() if model_name == "stem" else torchvision.models.resnet18(num_classes=1000)
    if norm == "cbn":
        cbn.convert(model, window=4)
    model.train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))

    def step() -> None:
        out = forward(images)
        loss = out.square().mean() if model_name == "stem" else torch.nn.functional.cross_entropy(out, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--model", choices=("resnet18", "stem"), default="resnet18")
    args = parser.parse_args()
    rounds = args.rounds
    torch.set_num_threads(2)
    steps = {}
    for name, (norm, compiled) in VARIANTS.items():
        steps[name] = training_step(norm, compiled, args.model)
        started = time.perf_counter()
        for _ in range(6):  # compiled, the window full
            steps[name]()
        print(f"{name}: warm-up {time.perf_counter() - started:.0f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # the order rotates
            started = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - started)
    for name, samples in times.items():
        print(f"{name:14s} median {statistics.median(samples) * 1e3:6.1f} ms  min {min(samples) * 1e3:6.1f} ms")
    print("step-time ratios, median of the rounds' ratios (range):")
    for a, b in RATIOS:
        per_round = sorted(x / y for x, y in zip(times[a], times[b]))
        print(f"  {a} / {b}: {statistics.median(per_round):.3f} ({per_round[0]:.2f}-{per_round[-1]:.2f})")


if __name__ == "__main__":
    main()
