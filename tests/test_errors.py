"""Bad input gets a clear error that names the layer, and never corrupts the history."""

import pytest
import torch
from torch import nn

import cbn
from helpers import batches, cbn_layers, conv_cbn_net, train


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 0}, "window must be an int >= 1"),
    ({"window": 2.5}, "window must be an int >= 1"),
    ({"burn_in": -1}, "burn_in must be an int >= 0"),
    ({"grad_path": "fast"}, r"grad_path must be one of \['efficient', 'naive'\]"),
    ({"track_running_stats": False}, "track_running_stats=False is not supported"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cbn.CrossIterationBatchNorm2d(8, **kwargs)


def test_input_must_be_4d():
    layer = cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))[1]
    with pytest.raises(ValueError, match=r"CrossIterationBatchNorm2d '1': expected a 4-D input.*\(2, 4, 5\)"):
        layer(torch.randn(2, 4, 5))


def test_channel_count_must_match():
    layer = cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))[1]
    with pytest.raises(ValueError, match="'1': expected 4 channels, got 6"):
        layer(torch.randn(2, 6, 5, 5))


@pytest.mark.parametrize("burn_in", [0, 10])
def test_training_without_a_bound_conv_says_how_to_bind_one(burn_in):
    layer = cbn.norm_layer("cbn", window=2, burn_in=burn_in)(4)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(RuntimeError, match=r"CrossIterationBatchNorm2d\(4\).*none is bound\. Call cbn\.convert\(model\)"):
        layer(x)
    assert torch.isfinite(layer.eval()(x)).all()  # inference needs no conv


def test_binding_checks_the_conv():
    layer = cbn.CrossIterationBatchNorm2d(4)
    with pytest.raises(ValueError, match="4 output channels"):
        cbn.CrossIterationBatchNorm2d(5).bind(nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError, match="plain nn.Conv2d"):
        layer.bind(nn.ConvTranspose2d(3, 4, 1))
    with pytest.raises(ValueError, match="integer zero padding only"):
        layer.bind(nn.Conv2d(3, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="integer zero padding only"):
        layer.bind(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def test_a_non_finite_batch_statistic_is_refused_and_does_not_poison_the_history():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    layer = cbn_layers(net)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = batches(1)[0]
    bad[0, 0, 0, 0] = float("inf")
    with torch.no_grad():  # move the weights so that the bad batch starts a new iteration
        net[0].weight.add_(0.01)
    with pytest.raises(FloatingPointError, match=r"'1': non-finite batch statistics at training iteration 3"):
        net(bad)
    after = layer.state_dict()
    for key in ("history_mean", "history_var", "history_grad_sq", "running_mean", "running_var"):
        assert torch.equal(before[key], after[key]), key
    assert after["_extra_state"][1:].tolist() == before["_extra_state"][1:].tolist()  # same slots
    assert after["_extra_state"][0] == 3  # the iteration happened; it is just not recorded
    outs = train(net, batches(2, seed=4))  # training goes on with clean data
    assert all(torch.isfinite(o).all() for o in outs)
    assert layer.window_entries == 3


def test_norm_layer_factory_errors():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'; choose one of bn, syncbn, gn"):
        cbn.norm_layer("batchnorm")
    with pytest.raises(TypeError, match="norm 'gn' takes num_groups; got groups"):
        cbn.norm_layer("gn", groups=16)
