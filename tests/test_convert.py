"""Converting torchvision models: pairing every norm with the conv that feeds it."""

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.ops.misc import Conv2dNormActivation

import cbn
from suites.data import synthetic_batch
from suites.models import DetectorSpec, build_detector


def test_resnet_norms_are_paired_with_their_convs():
    model = cbn.convert(resnet50(weights=None), window=2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)}
    assert len(layers) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    modules = dict(model.named_modules())
    assert layers["bn1"].conv is modules["conv1"]
    assert layers["layer1.0.bn3"].conv is modules["layer1.0.conv3"]
    assert layers["layer2.0.downsample.1"].conv is modules["layer2.0.downsample.0"]
    for name, layer in layers.items():
        assert layer.name == name and layer.conv.out_channels == layer.num_features


def test_convert_carries_weights_and_running_statistics():
    block = Conv2dNormActivation(3, 8, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        block[1].weight.uniform_()
        block[1].running_var.uniform_(1, 2)
    expected = {k: v.clone() for k, v in block.state_dict().items()}
    converted = cbn.convert(block, window=3)
    assert isinstance(converted[1], cbn.CrossIterationBatchNorm2d) and converted[1].conv is converted[0]
    for key, value in expected.items():
        assert torch.equal(converted.state_dict()[key], value)
    reference = Conv2dNormActivation(3, 8, norm_layer=nn.BatchNorm2d)
    reference.load_state_dict(expected)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(converted.eval()(x), reference.eval()(x))


class Unpairable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.post = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.post(self.act(self.conv(x)))


def test_unpairable_norms_are_named_and_the_model_is_left_untouched():
    model = nn.Sequential(Unpairable(), Conv2dNormActivation(4, 4))
    with pytest.raises(ValueError, match=r"cannot tell which conv feeds these norm layers: 0\.post\."):
        cbn.convert(model)
    assert isinstance(model[1][1], nn.BatchNorm2d)  # nothing converted before the error
    kept = cbn.convert(model, unpaired="keep")
    assert isinstance(kept[0].post, nn.BatchNorm2d) and isinstance(kept[1][1], cbn.CrossIterationBatchNorm2d)
    naive = cbn.convert(Unpairable(), compensate=False)  # Naive CBN needs no conv
    assert isinstance(naive.post, cbn.CrossIterationBatchNorm2d) and naive.post.conv is None


def test_a_model_with_nothing_to_convert_is_an_error_that_says_why():
    from torchvision.ops.misc import FrozenBatchNorm2d

    with pytest.raises(ValueError, match="Sequential has no BatchNorm2d, SyncBatchNorm or CBN layer.*norm_layer="):
        cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d layers \(1\), fixed affine maps that CBN does not replace"):
        cbn.convert(frozen)
    with pytest.raises(ValueError, match="include=... matched none of the norm layers of Sequential"):
        cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), include=lambda name, m: False)


def test_a_wrong_pairing_is_caught_at_run_time():
    model = Unpairable()
    model.post = cbn.CrossIterationBatchNorm2d(4, window=2).bind(model.conv, name="post", conv_name="conv")
    with pytest.raises(RuntimeError, match="'post'.*not the output of 'conv'"):
        model(torch.randn(2, 3, 4, 4))


def test_include_limits_conversion():
    model = cbn.convert(resnet18(weights=None), include=lambda name, m: name.startswith("layer4"))
    converted = [n for n, m in model.named_modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)]
    assert converted and all(n.startswith("layer4") for n in converted)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["cbn", "naive_cbn"])
def test_mask_rcnn_with_cbn_in_fpn_and_heads_trains_on_cpu(norm):
    spec = DetectorSpec(norm=norm, norm_options={"window": 2}, min_size_px=128, max_size_px=128,
                        sampled_rois_per_image=32, proposals_per_image=100)
    model = build_detector(spec).train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)}
    assert len(layers) == 16  # FPN 4 inner + 4 layer blocks, box head 4 convs, mask head 4 convs
    assert all(name.startswith(("backbone.fpn", "roi_heads.box_head", "roi_heads.mask_head")) for name in layers)
    assert all(m.conv is not None for m in layers.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for step in range(2):
        images, targets = synthetic_batch(2, 128, 128, seed=step)
        losses = model(images, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(m.window_entries == 2 and m.iteration == 2 for m in layers.values())


def test_convert_keeps_each_ranks_history_out_of_ddps_broadcast():
    """DDP reads _ddp_params_and_buffers_to_ignore from the module it wraps (tests/test_distributed.py
    shows what happens without it); an existing list is kept."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    net._ddp_params_and_buffers_to_ignore = ["0.weight"]
    cbn.convert(net, window=3)
    assert net._ddp_params_and_buffers_to_ignore == [
        "0.weight", "1.history_mean", "1.history_var", "1.history_iteration", "1.history_grad_mean", "1.history_grad_sq",
        "1.current_iteration", "1.nonfinite_batches", "1.compensated_entries", "1.negative_variances"]
    assert cbn.keep_statistics_per_rank(net)._ddp_params_and_buffers_to_ignore.count("1.history_mean") == 1
