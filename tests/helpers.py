"""Small networks and training loops shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cbn

# Tests parametrized over these run on CUDA wherever a device is present (tools/gpu-run's first step
# runs them: pytest -k cuda) and are skipped with the reason elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here; tools/gpu-run runs these on a GPU"))]


def conv_cbn_net(window: int = 4, burn_in: int = 0, grad_path: str = "efficient", compensate: bool = True,
                 dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Sequential:
    """conv -> CBN -> ReLU -> conv -> CBN, converted and bound."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(5),
    ).to(dtype)
    return cbn.convert(net, window=window, burn_in=burn_in, grad_path=grad_path, compensate=compensate)


def batches(count: int, shape=(2, 3, 10, 10), dtype=torch.float32, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) + 0.5).to(dtype) for _ in range(count)]


def train(net: nn.Module, inputs: list[torch.Tensor], lr: float = 0.1, forward=None) -> list[torch.Tensor]:
    """One SGD step per input on a fixed quadratic loss; returns the (detached) outputs."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    forward = forward or net
    outputs = []
    for x in inputs:
        out = forward(x)
        (out.square().mean() + out.mean()).backward()
        opt.step()
        opt.zero_grad()
        outputs.append(out.detach())
    return outputs


def cbn_layers(net: nn.Module) -> list[cbn.CrossIterationBatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)]
