"""state_dict round trips: an interrupted run resumes exactly; BN checkpoints load; copies stay bound."""

import copy
import io

import pytest
import torch
from helpers import batches, cbn_layers, conv_cbn_net, train
from torch import nn
from torch.testing import assert_close

import cbn


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain tensors and ints: no pickled objects needed


@pytest.mark.parametrize("grad_path", ["efficient", "naive"])
def test_resume_from_state_dict_continues_exactly(grad_path):
    inputs = batches(9, dtype=torch.float64)
    uninterrupted = conv_cbn_net(window=4, burn_in=1, grad_path=grad_path, dtype=torch.float64)
    first = copy.deepcopy(uninterrupted)
    expected = train(uninterrupted, inputs, lr=0.1)

    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    for x in inputs[:5]:
        (lambda out: (out.square().mean() + out.mean()).backward())(first(x))
        opt.step()
        opt.zero_grad()
    checkpoint = save_load({"model": first.state_dict(), "opt": opt.state_dict()})

    resumed = conv_cbn_net(window=4, burn_in=1, grad_path=grad_path, dtype=torch.float64)
    resumed.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(checkpoint["opt"])
    for x, want in zip(inputs[5:], expected[5:]):
        out = resumed(x)
        assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
        (out.square().mean() + out.mean()).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(cbn_layers(uninterrupted), cbn_layers(resumed)):
        assert a.iteration == b.iteration == 9
        assert a.slot_iterations == b.slot_iterations
        assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)


def test_state_dict_holds_counters_history_and_version():
    net = conv_cbn_net(window=3)
    train(net, batches(4))
    state = net.state_dict()
    assert state["1.current_iteration"].item() == 4  # four steps taken: the next forward is iteration 4
    assert state["1.history_iteration"].tolist() == [[2], [3]]  # the iteration each slot holds
    assert state["1.history_grad_sq"].shape == (2, 6, 27)  # per slot and channel, the 3x3x3 weights in a row
    assert state._metadata["1"]["version"] == cbn.CrossIterationBatchNorm2d._version


def test_a_checkpoint_from_a_newer_layer_version_is_refused():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    state = net.state_dict()
    state._metadata["1"]["version"] = cbn.CrossIterationBatchNorm2d._version + 1
    newer = cbn.CrossIterationBatchNorm2d._version + 1
    with pytest.raises(RuntimeError, match=f"saved by a newer CrossIterationBatchNorm2d .state version {newer}"):
        conv_cbn_net(window=3).load_state_dict(state)


def as_older_state(state: dict, layer: str, version: int) -> None:
    """Rewrite a layer's version-4 state in place as the given older version saved it."""
    stamps = state.pop(f"{layer}.history_iteration").view(-1)
    filled = stamps >= 0
    # Versions 1-3: [last trained iteration, each slot's iteration] as extra state, validity apart.
    last = state.pop(f"{layer}.current_iteration") - 1
    state[f"{layer}._extra_state"] = torch.cat((last.view(1), torch.where(filled, stamps, -1)))
    for field in ("grad_mean", "grad_sq"):  # 5-D then: (slots, groups or channels, C_in, 3, 3)
        state[f"{layer}.history_{field}"] = state[f"{layer}.history_{field}"].unflatten(2, (-1, 3, 3))
    if version > 1:  # version 1 had no validity flags
        state[f"{layer}.history_valid"] = filled
    if version < 3:  # two offset fields per slot that version 3 derives from the statistics
        state[f"{layer}.history_offset_mean"] = torch.randn_like(state[f"{layer}.history_mean"])
        state[f"{layer}.history_offset_sq"] = torch.randn_like(state[f"{layer}.history_mean"])
    state._metadata[layer]["version"] = version


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_checkpoint_loads_and_continues_exactly(version):
    inputs = batches(7, dtype=torch.float64)
    net = conv_cbn_net(window=3, dtype=torch.float64)
    train(net, inputs[:4])
    old = net.state_dict()
    for layer in ("1", "4"):
        as_older_state(old, layer, version)
    resumed = conv_cbn_net(window=3, dtype=torch.float64)
    resumed.load_state_dict(old)  # strict: the old fields are consumed, nothing is missing
    assert resumed[1].slot_iterations == [2, 3] and resumed[1].iteration == 4
    reference = copy.deepcopy(net)
    for a, b in zip(train(reference, inputs[4:]), train(resumed, inputs[4:])):
        assert torch.equal(a, b)


def test_a_batchnorm_checkpoint_loads_into_cbn_with_a_fresh_history():
    bn_net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    bn_net[1].running_mean.fill_(0.5)
    net = cbn.convert(copy.deepcopy(bn_net))
    train(net, batches(3))
    net.load_state_dict(bn_net.state_dict())  # strict: no missing keys
    layer = net[1]
    assert layer.iteration == 0 and layer.slot_iterations == [-1, -1, -1]
    assert torch.equal(layer.running_mean, torch.full((6,), 0.5))


def test_loading_a_checkpoint_with_another_window_is_refused():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    other = conv_cbn_net(window=5)
    with pytest.raises(RuntimeError, match=r"1.history_mean: the checkpoint holds shape \(2, 6\), but this layer "
                                           r"\(window=5, 6 channels, conv weight \(6, 3, 3, 3\)\) keeps \(4, 6\)"):
        other.load_state_dict(net.state_dict())
    state = {k: v for k, v in net.state_dict().items() if "history" not in k}  # no history: it starts afresh
    other.load_state_dict(state)
    assert other[1].slot_iterations == [-1] * 4 and other[1].iteration == 3


def test_a_history_buffer_that_does_not_fit_the_bound_conv_is_refused_by_name():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    state = net.state_dict()
    state["1.history_grad_sq"] = torch.zeros(2, 6, 9)  # another conv's geometry
    fresh = conv_cbn_net(window=3)
    with pytest.raises(RuntimeError, match=r"1.history_grad_sq: the checkpoint holds shape \(2, 6, 9\), but "
                                           r"this layer .* keeps \(2, 6, 27\)"):
        fresh.load_state_dict(state)
    assert fresh[1].slot_iterations == [-1, -1]  # nothing of the misfit loaded


def test_deepcopy_binds_the_copy_to_the_copied_conv():
    net = conv_cbn_net(window=3)
    train(net, batches(2))
    clone = copy.deepcopy(net)
    assert clone[1].conv is clone[0] and clone[4].conv is clone[3]
    train(clone, batches(2, seed=3))
    assert net[1].iteration == 2 and clone[1].iteration == 4  # each advanced by its own optimizer
