"""Counted memory of a training step, against hand-computed byte counts."""

import torch
from torch import nn

import cbn
from bench.memory import SavedTensors, counted_training_memory, storage_bytes


def test_storage_bytes_counts_each_storage_once():
    t = torch.zeros(10, 10)
    assert storage_bytes([t, t[0], t.view(100)]) == 400
    assert storage_bytes([t], exclude={t.untyped_storage().data_ptr()}) == 0


def test_saved_tensors_of_a_conv_and_a_square():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.randn(2, 3, 8, 8)
    with SavedTensors() as saved:
        loss = conv(x).square().sum()
    params = {conv.weight.untyped_storage().data_ptr()}
    # the conv saves its input (2*3*8*8 floats), square saves its input (2*4*6*6 floats)
    assert storage_bytes(saved.tensors, exclude=params) == 4 * (2 * 3 * 8 * 8 + 2 * 4 * 6 * 6)
    loss.backward()


def test_counted_training_memory_of_a_small_cbn_net():
    net = cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), window=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        counted = counted_training_memory(net, opt, lambda: net(x).square().sum())
    params = 4 * (4 * 3 * 3 * 3 + 4 + 4)  # conv weight, gamma, beta
    assert counted["parameters_bytes"] == params
    assert counted["gradients_bytes"] == params
    assert counted["optimizer_state_bytes"] == params  # SGD momentum buffers
    assert counted["cbn_history_bytes"] == net[1].history_bytes() > 0
    assert counted["saved_activations_bytes"] > 4 * 2 * 3 * 8 * 8
    assert counted["counted_total_bytes"] == sum(v for k, v in counted.items() if k != "counted_total_bytes")
    again = counted_training_memory(net, opt, lambda: net(x).square().sum())
    assert again == counted  # deterministic: same shapes, same count
