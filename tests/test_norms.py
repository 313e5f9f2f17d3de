"""Norm layers by name, as torchvision norm_layer= callables."""

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import cbn


@pytest.mark.parametrize("kind, expected_type", [
    ("bn", nn.BatchNorm2d),
    ("syncbn", nn.SyncBatchNorm),
    ("gn", nn.GroupNorm),
    ("frozenbn", FrozenBatchNorm2d),
    ("cbn", cbn.CrossIterationBatchNorm2d),
    ("naive_cbn", cbn.CrossIterationBatchNorm2d),
])
def test_every_named_norm_builds_a_layer(kind, expected_type):
    layer = cbn.norm_layer(kind)(64)
    assert isinstance(layer, expected_type)


def test_options_reach_the_layer():
    gn = cbn.norm_layer("gn", num_groups=16)(64)
    assert gn.num_groups == 16
    layer = cbn.norm_layer("cbn", window=8, burn_in=100, grad_path="naive")(32)
    assert (layer.window, layer.burn_in, layer.grad_path, layer.compensate) == (8, 100, "naive", True)
    assert cbn.norm_layer("naive_cbn")(32).compensate is False
    assert cbn.norm_layer("none") is None


def test_callables_pass_through():
    assert cbn.norm_layer(nn.BatchNorm2d) is nn.BatchNorm2d
    assert cbn.norm_layer(nn.BatchNorm2d, momentum=0.3)(4).momentum == 0.3


@pytest.mark.parametrize("images_per_device, window", [(1, 8), (2, 8), (4, 4), (5, 4), (16, 1), (32, 1)])
def test_suggested_window_follows_the_paper(images_per_device, window):
    assert cbn.suggested_window(images_per_device) == window


def test_cbn_in_a_torchvision_head_after_convert():
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    head = cbn.convert(MaskRCNNHeads(16, [16, 16], 1, norm_layer=cbn.norm_layer("cbn", window=2)))
    layers = [m for m in head.modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)]
    assert len(layers) == 2 and all(isinstance(m.conv, nn.Conv2d) for m in layers)
    head(torch.randn(3, 16, 7, 7)).sum().backward()
