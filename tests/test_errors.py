"""Bad input gets a clear error that names the layer, and never corrupts the history."""

import warnings

import pytest
import torch
from helpers import batches, cbn_layers, conv_cbn_net, train
from torch import nn

import cbn


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


def a_bad_step(net):
    """One training iteration on a batch with an inf: new weights first, so it is a new iteration."""
    bad = batches(1)[0]
    bad[0, 0, 0, 0] = float("inf")
    with torch.no_grad():
        net[0].weight.add_(0.01)
    return net(bad)


def test_a_non_finite_batch_is_kept_out_of_the_history_without_a_host_sync():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    layer = cbn_layers(net)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    out = a_bad_step(net)  # no exception: raising would need the host to wait for the device
    assert not torch.isfinite(out).all()  # the batch itself is normalized as BN would
    after = layer.state_dict()
    for key in ("running_mean", "running_var"):
        assert torch.equal(before[key], after[key]), key  # no channel took a non-finite update
    assert after["current_iteration"].item() == 3  # iteration 3 went to slot 1 ...
    assert layer.slot_iterations == [2, -1]  # ... stamped empty: it never enters a window
    assert layer.nonfinite_batches == 1 and cbn_layers(net)[1].nonfinite_batches == 1

    clean = batches(2, seed=4)
    seen = []
    outs = train(net, clean, forward=lambda x: (lambda out: (seen.append(layer.window_entries), out)[1])(net(x)))
    assert all(torch.isfinite(o).all() for o in outs)  # training goes on with clean data
    # No update since the bad batch, so the first clean call is still iteration 3 (window {2, 1}, not
    # recorded again); iteration 4's window {3, 2} then counts 3 out.
    assert seen == [3, 2]
    assert layer.nonfinite_batches == 1


def test_the_window_statistics_leave_the_bad_entry_out_by_content():
    """With momentum 1 the running mean is the window mean: Naive CBN averages the good entries only."""
    net = conv_cbn_net(window=3, compensate=False)
    layer = cbn_layers(net)[0]
    layer.momentum = 1.0
    train(net, batches(2), lr=0.0)  # lr 0: the iterations still advance (SGD updates in place)
    a_bad_step(net)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        net[0].weight.add_(0.01)  # a new iteration, whose window is {bad iteration 2, iteration 1}
        current = net[0](x).mean((0, 2, 3))
    good_past = layer.history_mean[layer.slot_iterations.index(1)]
    with torch.no_grad():
        net(x)
    torch.testing.assert_close(layer.running_mean, (current + good_past) / 2)


def test_a_finite_entry_that_compensates_to_nan_leaves_the_window():
    """A recorded entry can be finite and still compensate to inf or nan (a gradient field that
    overflowed): the window weighs it 0 then, and the step stays finite."""
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    layer = cbn_layers(net)[0]
    slot = layer.slot_iterations.index(2)
    layer.history_grad_sq[slot, 0, 0] = float("nan")  # channel 0 of iteration 2's entry
    entries = []
    outs = train(net, batches(1, seed=5), forward=lambda x: (lambda out: (entries.append(layer.window_entries), out)[1])(net(x)))
    assert entries == [2]  # iteration 3's window: itself and iteration 1; iteration 2 is out
    assert torch.isfinite(outs[0]).all()
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert layer.nonfinite_batches == 0  # no batch was bad: nothing to report


def test_non_finite_batches_are_reported_at_eval_and_by_check_finite():
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    cbn.check_finite(net)  # nothing to report
    a_bad_step(net)
    with pytest.warns(RuntimeWarning) as warned:
        net.eval()
    assert [str(w.message).split(":")[0] for w in warned] == ["CrossIterationBatchNorm2d '1'", "CrossIterationBatchNorm2d '4'"]
    assert "1 training batch(es) had non-finite statistics" in str(warned[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.train().eval()  # reported once, not again
    with pytest.raises(FloatingPointError, match=r"in CrossIterationBatchNorm2d '1': 1; CrossIterationBatchNorm2d '4': 1"):
        cbn.check_finite(net)


def test_norm_layer_factory_errors():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'; choose one of bn, syncbn, gn"):
        cbn.norm_layer("batchnorm")
    with pytest.raises(TypeError, match="norm 'gn' takes num_groups; got groups"):
        cbn.norm_layer("gn", groups=16)
