"""The training-quality suite: identical starting points and images across norms, the claim
verdicts on constructed differences, and one smoke-sized run through workloads, tables and figures."""

import math

import pytest
import torch
from test_results import environment
from torch import nn

import cbn
from bench import codec
from bench.results import CaseResult, Derived, FigureId, RunResult
from suites import images, minitrain, quality


def test_bn_at_k_times_m_sees_the_m_runs_batches_k_at_a_time():
    x, y = minitrain._grouped_batch(3, 4, 2, 16, seed=5)
    parts = [images.batch(step, 2, 16, seed=5) for step in range(12, 16)]
    assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_every_norm_starts_from_the_bn_networks_weights_with_its_options():
    torch.manual_seed(0)
    bn = minitrain.conv_net(4, 10)
    p = quality.PROFILES["cpu"]
    for case in quality.cases("cpu", "cpu"):
        recipe = quality.recipe(p, case.settings.variant, case.settings.window, case.settings.burn_in)
        model = minitrain.with_norm(bn, recipe)
        assert torch.equal(model[0].weight, bn[0].weight)
        norm = model[1]
        if recipe.norm in ("cbn", "naive_cbn"):
            assert isinstance(norm, cbn.CrossIterationBatchNorm2d) and norm.conv is model[0]
            assert (norm.window, norm.burn_in, norm.compensate, norm.negative_variance) == (
                recipe.window, recipe.burn_in, recipe.norm == "cbn", recipe.negative_variance)
        else:
            assert type(norm) is {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm}[recipe.norm]
    assert quality.recipe(p, "bn_km", 4, None) == minitrain.Recipe("bn", 8, 125, 0.2)  # same images, linear lr
    assert quality.recipe(p, "cbn_drop", 8, 0.25) == minitrain.Recipe("cbn", 2, 500, 0.05, 8, 125, "drop")


def test_the_cpu_profile_covers_every_window_burn_in_and_claim():
    names = [c.name for c in quality.cases("cpu", "cpu")]
    assert names[:9] == ["bn", "bn_control", "gn", "bn_km-k2", "bn_km-k4", "bn_km-k8", "bn_accum-k2", "bn_accum-k4",
                         "bn_accum-k8"]
    for k in (2, 4, 8):
        for b in ("0.25", "0.5"):
            assert {f"{v}-k{k}-burn{b}" for v in quality.WINDOWED} <= set(names)
    assert {"cbn-k4-burn0", "cbn-k4-burn0.75"} <= set(names) and len(names) == len(set(names)) == 29
    texts = [c.text for c in quality.claims(quality.PROFILES["cpu"])]
    assert "Naive CBN fails at k=8: CBN above it (burn-in 0.25)" in texts
    assert sum("stable over burn-ins" in t for t in texts) == 3  # 0, 0.5, 0.75 against 0.25
    assert quality.seeds_of(quality.PROFILES["cpu"], "bn_control") == [1000, 1001, 1002]


def difference(value: float, low: float, high: float) -> Derived:
    return Derived(FigureId("quality", "a", "accuracy", "minus:b"), "a - b", value, low, high)


@pytest.mark.parametrize("d, relation, margin, expected", [
    (difference(0.10, 0.05, 0.15), "above", 0.03, "holds"),
    (difference(0.02, 0.01, 0.03), "above", 0.03, "not resolved"),  # better, but not by more than the control
    (difference(-0.10, -0.15, -0.05), "above", 0.03, "does not hold"),
    (difference(0.05, -0.02, 0.12), "above", 0.03, "not resolved"),
    (difference(-0.30, -0.50, -0.10), "close", 0.4, "does not hold"),  # clearly apart, however noisy the control
    (difference(0.00, -0.02, 0.02), "close", 0.03, "holds"),
    (difference(-0.10, -0.15, -0.05), "close", 0.03, "does not hold"),
    (difference(0.00, -0.08, 0.08), "close", 0.03, "not resolved"),
    (difference(0.00, -0.02, 0.02), "close", 0.2, "not resolved (control margin 0.200 > 0.05: more seeds)"),
    (difference(0.00, math.nan, math.nan), "close", 0.03, "not resolved (no interval: needs two seeds and the control)"),
])
def test_each_verdict_fires(d, relation, margin, expected):
    assert quality.verdict(d, relation, margin) == expected


def test_accumulating_runs_normalize_m_images_at_a_time_with_the_k_x_m_gradient_batch():
    torch.manual_seed(0)
    bn = minitrain.conv_net(4, 10)
    seen: list[int] = []
    bn[1].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))  # deepcopy keeps it
    recipe = quality.recipe(quality.PROFILES["smoke"], "bn_accum", 2, None)
    assert (recipe.batch, recipe.accumulate, recipe.steps) == (4, 2, 8)
    minitrain.train(bn, recipe, m=2, image_px=16, seed=0, evaluations=1, held_out=minitrain.held_out_set(10, 16),
                    device=torch.device("cpu"))
    assert seen[:16] == [2] * 16  # 8 steps of two 2-image passes, then evaluation


def test_a_diverging_run_is_recorded_not_raised():
    torch.manual_seed(0)
    bn = minitrain.conv_net(4, 10)
    held_out = minitrain.held_out_set(10, 16)
    run = minitrain.train(bn, minitrain.Recipe("bn", 2, 20, 1e6), m=2, image_px=16, seed=0, evaluations=2,
                          held_out=held_out, device=torch.device("cpu"))
    assert run.diverged and math.isnan(run.final_loss) and 0 <= run.accuracy[-1] <= 1


SMOKE_CASES = ("bn", "bn_control", "gn", "bn_km-k2", "bn_accum-k2", "naive_cbn-k2-burn0.25", "cbn-k2-burn0.25", "cbn_drop-k2-burn0.25",
               "cbn-k2-burn0.5", "cbn-k2-burn0")


def test_the_smoke_profile_runs_and_renders(tmp_path):
    results = []
    for case in quality.cases("smoke", "cpu"):
        if case.name not in SMOKE_CASES:
            continue
        measurement = quality.build(case, "cpu").measure()
        m = measurement.metrics
        assert 0 <= m["accuracy"].value <= 1 and m["final loss"].value > 0 and m["diverged"].value == 0
        assert m["accuracy"].value == pytest.approx((m["seed 0.accuracy"].value + m["seed 1.accuracy"].value) / 2)
        assert {n for n in m if n.startswith("seed 0.curve ")} == {
            f"seed 0.curve {e}.{q}" for e in (16, 32) for q in ("train loss", "accuracy")}
        if case.settings.variant not in ("cbn", "cbn_drop"):
            assert m["negative variance rate"].value == 0
        results.append(CaseResult(case.suite, case.name, codec.encode(case.settings), "ok", None, m, notes=measurement.notes))
    derived = quality.derive(results)
    names = {d.id.key for d in derived}
    assert "bn_control/accuracy/minus:bn" in names and "cbn-k2-burn0.25/accuracy_claim_above/minus:bn" in names
    claims = [d for d in derived if d.id.quantity.startswith("accuracy_claim_")]
    assert claims and all(d.note and d.label.startswith("claim: ") for d in claims)
    run = RunResult("smoke", "cpu", ["quality"], environment(), results, derived)
    results_table, claims_table = quality.tables(run)
    assert [row[0] for row in results_table.rows][:4] == ["BN", "BN, other seeds (A/A)", "GN", "BN (k x m)"]
    assert len(claims_table.rows) == len(claims)
    paths = quality.figures(run, tmp_path / "run")
    assert [p.name for p in paths] == ["run_quality_curves.png", "run_quality_windows.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
