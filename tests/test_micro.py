"""The pytest-benchmark micro suite: collectable outside the unit tests, and its JSON read strictly."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import env, pytest_suites
from bench.results import ResultsFileError
from suites import PYTEST_SUITES, micro
from suites.micro import NORMS, conv_norm_block

MICRO_BENCHMARKS = PYTEST_SUITES["micro"]

ROOT = Path(__file__).resolve().parents[1]


def test_the_micro_suite_collects_every_norm_and_op_but_the_unit_tests_do_not():
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             str(MICRO_BENCHMARKS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in listed.stdout.splitlines() if "::test_conv_norm[" in line]
    assert len(ids) == 2 * len(NORMS)
    assert any("forward+backward-cbn-naive-path" in i for i in ids)
    unit = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "suites/micro.py" not in unit.stdout


@pytest.mark.parametrize("norm", NORMS)
def test_each_block_trains_and_cbn_blocks_are_bound(norm):
    block = conv_norm_block(norm, 32, torch.device("cpu"))
    x = torch.randn(2, 32, 6, 6)
    block(x).square().mean().backward()
    assert block[0].weight.grad is not None
    if norm.startswith(("cbn", "naive")):
        assert block[1]._conv is block[0]


def write(tmp_path, data) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return path


def micro_json(version: int = 1) -> dict:
    def bench(group, norm, times):
        return {"group": group, "extra_info": {"norm": norm, "reference": norm == "bn"}, "stats": {"data": times}}

    info = {"schema": pytest_suites.SCHEMA, "schema_version": version, "device": "cpu", "profile": "cpu",
            "environment": dataclasses.asdict(env.capture("cpu", []))}
    benchmarks = [bench("forward", "bn", [1.0, 1.1, 0.9]), bench("forward", "cbn", [2.0, 2.2, 1.8]),
                  bench("forward+backward", "bn", [3.0, 3.0, 3.0]), bench("forward+backward", "cbn", [4.5, 4.5, 4.5])]
    benchmarks[3]["extra_info"].update(aten_ops=224, host_syncs=0)
    return {"machine_info": {"cbn_bench": info}, "benchmarks": benchmarks}


def test_dispatch_counts_stored_by_a_benchmark_are_read_as_count_metrics(tmp_path):
    run = pytest_suites.load(write(tmp_path, micro_json()))
    counted = {c.case: c.metrics for c in run.cases}["forward+backward/cbn"]
    assert (counted["aten_ops"].value, counted["aten_ops"].kind) == (224, "count")
    assert (counted["host_syncs"].value, counted["host_syncs"].kind) == (0, "count")
    assert "aten_ops" not in {c.case: c.metrics for c in run.cases}["forward/cbn"]


def test_ratios_are_taken_within_each_group(tmp_path):
    run = pytest_suites.load(write(tmp_path, micro_json()))
    ratios = {str(d.id): d.value for d in run.derived}
    assert ratios == {"micro.forward/cbn/min_time/ratio_to:bn": pytest.approx(2.0),  # minimum times: 1.8 / 0.9
                      "micro.forward+backward/cbn/min_time/ratio_to:bn": pytest.approx(1.5)}
    assert all(d.kind == "timing" for d in run.derived)
    cbn = next(c for c in run.cases if c.case == "forward/cbn")
    assert cbn.metrics["time"].samples == (2.0, 2.2, 1.8) and cbn.metrics["time"].value == 2.0
    table = pytest_suites.table(run)
    assert table.rows[1][0] == "cbn" and table.rows[1][2] == "2.00"  # x ref (min)
    assert table.rows[1][3].startswith("2.00 [")  # x ref (median [95% CI])
    assert table.caption[0].startswith("subject not recorded; reference bn")  # a file from before subjects


def test_the_caption_says_what_the_benchmarks_recorded_they_time(tmp_path):
    data = micro_json()
    for bench in data["benchmarks"]:
        bench["extra_info"]["subject"] = micro.SUBJECT
    table = pytest_suites.table(pytest_suites.load(write(tmp_path, data)))
    assert table.caption[0].startswith(f"{micro.SUBJECT}; reference bn")


@pytest.mark.parametrize("data, message", [
    ({"benchmarks": [], "machine_info": {}}, "not a cbn-bench micro-benchmark file"),
    (micro_json(version=7), "micro schema version 7"),
    ({**micro_json(), "benchmarks": [{"group": "forward"}]}, "malformed micro-benchmark file"),
])
def test_foreign_or_malformed_micro_files_are_refused(tmp_path, data, message):
    with pytest.raises(ResultsFileError, match=message):
        pytest_suites.load(write(tmp_path, data))


def test_running_without_pytest_benchmark_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_benchmark", None)
    with pytest.raises(ValueError, match=r"pip install -e '.\[test\]'"):
        pytest_suites.run("micro", "cpu", tmp_path)


def test_cbns_ideal_block_is_bn_plus_the_conv_weight_gradient_cbn_adds():
    from suites.micro import WithWeightGradient

    block = conv_norm_block("bn+wgrad", 8, torch.device("cpu"))
    ideal = WithWeightGradient(block)
    x = torch.randn(2, 8, 6, 6)
    out, grad = ideal(x)
    y = block[0](x)
    assert torch.equal(out, block(x))
    expected, = torch.autograd.grad((block[0](x) * y.detach()).sum(), block[0].weight)
    torch.testing.assert_close(grad, expected)
    assert not grad.requires_grad
