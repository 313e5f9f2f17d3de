"""CBN under torch.compile. Dynamo's capture (backend "eager": no inductor, so the test is quick)
must trace the layer's autograd function and train exactly as eager does. Recompilations and the
inductor backend are issue 14's."""

import copy

import torch

from helpers import batches, cbn_layers, conv_cbn_net, train


def test_a_compiled_cbn_net_trains_exactly_as_eager():
    torch._dynamo.reset()
    eager = conv_cbn_net(window=3)
    compiled = copy.deepcopy(eager)
    inputs = batches(5)
    want = train(eager, inputs)
    got = train(compiled, inputs, forward=torch.compile(compiled, backend="eager"))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(cbn_layers(eager), cbn_layers(compiled)):
        assert a.iteration == b.iteration == 4 and a._slot_iterations == b._slot_iterations
        for name in ("history_mean", "history_var", "history_grad_sq", "running_var"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
