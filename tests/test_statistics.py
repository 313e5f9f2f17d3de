"""The statistics-quality suite: its error metric on cases with known answers, its truncation ratio
against torch.func, and one smoke-sized run through the suite's workload, tables and figures."""

import copy
from pathlib import Path

import pytest
import torch
from test_results import environment
from torch import nn
from torch.func import functional_call, jacrev
from torch.testing import assert_close

import cbn
from bench import codec
from bench.results import CaseResult, RunResult
from suites import estimation, images, statistics


def one_conv_net() -> nn.Sequential:
    """A single conv straight on the data, then the norm: its statistics are those of a linear map."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def window_errors(lr: float, window: int = 3, steps: int = 6) -> dict[str, tuple[float, float]]:
    """Train BN, Naive CBN and CBN copies of one_conv_net; the norm layer's errors at the last step."""
    bn = one_conv_net().double()
    models = {"bn": bn, "naive_cbn": cbn.convert(copy.deepcopy(bn), window=window, compensate=False),
              "cbn": cbn.convert(copy.deepcopy(bn), window=window)}
    twin = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) + 0.3, torch.randint(2, (2,), generator=gen))
            for _ in range(steps)]
    errors = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # lr 0 still advances CBN's window
        for step, (x, y) in enumerate(data):
            with estimation.UsedStatistics(model) as used:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if step == steps - 1:
                truth = estimation.window_truth(twin, model, torch.cat([d[0] for d in data[steps - window:]]), used.stats)
                errors[name] = estimation.relative_errors(used.stats["1"], truth["1"])
            opt.step()
            opt.zero_grad()
    return errors


def test_recomputing_a_bn_steps_own_batch_gives_what_every_layer_used():
    """window_truth keeps the layers before each one normalizing as in the step: over the step's
    own examples it reproduces BN's statistics in every layer, not only the first."""
    net = three_layer_net()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with estimation.UsedStatistics(net) as used:
        net(x)
    truth = estimation.window_truth(copy.deepcopy(net), net, x, used.stats)
    assert list(truth) == ["1", "4", "7"]
    for name, stats in used.stats.items():
        assert estimation.relative_errors(stats, truth[name]) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_with_frozen_weights_compensated_naive_and_recomputed_statistics_coincide():
    errors = window_errors(lr=0.0)
    for name in ("naive_cbn", "cbn"):
        assert errors[name][0] < 1e-12 and errors[name][1] < 1e-12, name
    assert min(errors["bn"]) > 1e-3  # one batch is not the window


@pytest.mark.parametrize("lr", [0.05, 0.5])
def test_a_weight_change_linear_in_the_statistics_is_compensated_exactly_for_the_mean(lr):
    errors = window_errors(lr)
    assert errors["cbn"][0] < 1e-12  # the mean of a conv's output is linear in its weights
    assert errors["naive_cbn"][0] > 1e-2  # averaging stale means is not


def test_the_variance_error_left_is_second_order_in_the_weight_change():
    """nu is quadratic in the weights and CBN keeps its first-order term: 5x smaller steps leave
    about 25x less error, where Naive CBN's falls about linearly. (At lr 0.5 with momentum the
    first-order term overshoots: CBN's variance error, 0.51, is then above Naive CBN's, 0.16.)"""
    small, large = window_errors(0.01), window_errors(0.05)
    assert large["cbn"][1] / small["cbn"][1] > 10
    assert large["naive_cbn"][1] / small["naive_cbn"][1] < 5
    assert small["cbn"][1] < small["naive_cbn"][1] / 10


def three_layer_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3)).double()


def exact_ratio(net: nn.Module, x: torch.Tensor, norm: str, own: str, back: str, stat: str) -> float:
    """||d s / d theta_back||_F / ||d s / d theta_own||_F by jacrev of a functional call."""
    params = dict(net.named_parameters())
    index = int(norm)

    head = copy.deepcopy(net[:index])  # up to the norm layer, whose input it returns
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):  # batch statistics without running ones, which jacrev cannot update
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    head_params = dict(head.named_parameters())

    def statistic(weights: dict) -> torch.Tensor:
        inner = functional_call(head, {**head_params, **weights}, (x,))
        return inner.mean((0, 2, 3)) if stat == "mu" else inner.square().mean((0, 2, 3))

    names = [f"{own}.weight", f"{back}.weight"]
    jac = jacrev(statistic)({n: params[n] for n in names})
    return float((jac[names[1]].norm() / jac[names[0]].norm()).detach())


def test_truncation_ratios_against_torch_func():
    net = three_layer_net()
    convs = {"1": "0", "4": "3", "7": "6"}
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = estimation.truncation_ratios(net, convs, x, probes=None)
    for stat in ("mu", "nu"):
        want_r1 = [exact_ratio(net, x, "4", "3", "0", stat), exact_ratio(net, x, "7", "6", "3", stat)]
        assert_close(got[f"{stat} r=1"], sum(want_r1) / 2, rtol=1e-9, atol=0)
        assert_close(got[f"{stat} r=2"], exact_ratio(net, x, "7", "6", "0", stat), rtol=1e-9, atol=0)
    estimated = estimation.truncation_ratios(net, convs, x, probes=3000, generator=torch.Generator().manual_seed(0))
    for key, value in got.items():
        assert abs(estimated[key] - value) < 0.1 * value, key  # random probes converge on the exact ratio


def test_sample_images_give_repeatable_natural_batches():
    x, y = images.batch(5, 3, 32)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == images.batch(5, 3, 32)[1].tolist()
    assert torch.equal(x, images.batch(5, 3, 32)[0])
    assert not torch.equal(x, images.batch(6, 3, 32)[0])
    assert 0.3 < float(x.std()) < 3.0  # normalized photographs, not noise or blanks


def test_the_smoke_profile_runs_and_renders(tmp_path):
    """Both regimes at smoke size, two seeds each: per-seed and over-seed figures, the negative
    variance rates, the paired verdicts, every table and figure."""
    results = []
    for case in statistics.cases("smoke", "cpu"):
        measurement = statistics.build(case, "cpu").measure()
        metrics = measurement.metrics
        for v in statistics.ESTIMATORS:
            assert 0 < metrics[f"{v}.mean error"].value < 10 and 0 < metrics[f"{v}.var error"].value < 10
            assert metrics[f"{v}.mean error sd"].value >= 0
            assert metrics[f"{v}.mean error"].value == pytest.approx(
                (metrics[f"seed 0.{v}.mean error"].value + metrics[f"seed 1.{v}.mean error"].value) / 2)
        for v in statistics.VARIANTS:
            assert metrics[f"{v}.final loss"].value > 0
        assert 0 <= metrics["cbn.negative variance rate"].value <= 1
        assert any(name.startswith("cbn.negative variance rate.layer ") for name in metrics)
        assert 0 < metrics["truncation mu r=1"].value < 10 and "seed 1.truncation mu r=1" not in metrics
        results.append(CaseResult(case.suite, case.name, codec.encode(case.settings), "ok", None, metrics,
                                  notes=measurement.notes))
    assert [c.case for c in results] == ["scratch-k2-lr0.02", "settled-k2-lr0.02"]
    derived = statistics.derive(results)
    assert {d.id.key for d in derived} == {f"{c}/cbn/{s}_error/minus:best_other"
                                           for c in ("scratch-k2-lr0.02", "settled-k2-lr0.02") for s in ("mean", "var")}
    assert all(d.note in ("lower beyond noise", "higher beyond noise", "within noise") for d in derived)
    run = RunResult("smoke", "cpu", ["statistics"], environment(), results, derived)
    tables = statistics.tables(run)
    assert [t.title.split(",")[0] for t in tables] == ["Statistics estimation error", "Taylor truncation ratios",
                                                       "Estimation error per layer", "Estimation error per layer"]
    assert [row[0] for row in tables[0].rows] == ["scratch", "settled"] and tables[0].rows[0][9].endswith("/2")
    paths = statistics.figures(run, tmp_path / "run")
    assert [p.name for p in paths] == [f"run_statistics_{kind}_{regime}.png" for regime in ("scratch", "settled")
                                       for kind in ("window", "steps")]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_the_settled_regime_starts_where_a_bn_burn_in_leaves_off():
    """settle_steps of BN training on the seed's batches, optimizer state included: every copy starts
    from those weights (CBN after a burn-in of as many steps), with momentum buffers to match."""
    p = statistics.PROFILES["smoke"]
    run = statistics.SeedRun(p, 2, 0.02, "settled", seed=1, device=torch.device("cpu"))
    torch.manual_seed(1)
    bn = statistics.MODELS[p.model](len(images.SAMPLES))
    opt = statistics._sgd(bn, 0.02)
    for step in range(p.settle_steps):
        x, y = images.batch(step, p.batch, p.image_px, seed=1)
        nn.functional.cross_entropy(bn(x), y).backward()
        opt.step()
        opt.zero_grad()
    for name, model in run.models.items():
        assert_close(model.conv1.weight, bn.conv1.weight, rtol=0, atol=0, msg=name)
        state = run.optimizers[name].state_dict()["state"]
        assert_close(state[0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"], rtol=0, atol=0)
    assert run.start == p.settle_steps
    assert statistics.SeedRun(p, 2, 0.02, "scratch", seed=1, device=torch.device("cpu")).start == 0


def test_a_file_from_before_regimes_and_seeds_still_renders():
    """The committed from-scratch result (one seed, no regime): tables from its stored figures."""
    from bench.results import load

    run = load(Path(__file__).parents[1] / "results/runs/20261127T083030Z_cpu_cpu-amd-epyc.json")
    table = statistics.tables(run)[0]
    assert [row[:3] for row in table.rows][:2] == [["scratch", "0.01", "2"], ["scratch", "0.01", "4"]]
    assert [row[9] for row in table.rows] == ["1/1", "0/1", "1/1", "0/1", "0/1", "1/1"]
