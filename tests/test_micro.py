"""The pytest-benchmark micro suite: collectable outside the unit tests, and its JSON read strictly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import micro
from bench.results import ResultsFileError
from suites import MICRO_BENCHMARKS
from suites.micro import NORMS, conv_norm_block

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

    info = {"schema": micro.SCHEMA, "schema_version": version, "device": "cpu", "profile": "cpu",
            "environment": {"device_name": "cpu: test", "cpu_model": "test", "threads": 2}}
    return {"machine_info": {"cbn_bench": info}, "benchmarks": [
        bench("forward", "bn", [1.0, 1.1, 0.9]), bench("forward", "cbn", [2.0, 2.2, 1.8]),
        bench("forward+backward", "bn", [3.0, 3.0, 3.0]), bench("forward+backward", "cbn", [4.5, 4.5, 4.5])]}


def test_ratios_are_taken_within_each_group(tmp_path):
    run = micro.load(write(tmp_path, micro_json()))
    assert run.ratios()[("forward", "cbn")] == pytest.approx(2.0)  # minimum times: 1.8 / 0.9
    assert run.ratios()[("forward+backward", "cbn")] == pytest.approx(1.5)
    median = run.median_ratios()[("forward", "cbn")]
    assert median.median == pytest.approx(2.0) and median.ci_low <= 2.0 <= median.ci_high
    assert run.reference_norms == {"forward": "bn", "forward+backward": "bn"}
    assert micro.table(run).rows[1][0] == "cbn"


@pytest.mark.parametrize("data, message", [
    ({"benchmarks": [], "machine_info": {}}, "not a cbn-bench micro-benchmark file"),
    (micro_json(version=7), "micro schema version 7"),
    ({**micro_json(), "benchmarks": [{"group": "forward"}]}, "malformed micro-benchmark file"),
])
def test_foreign_or_malformed_micro_files_are_refused(tmp_path, data, message):
    with pytest.raises(ResultsFileError, match=message):
        micro.load(write(tmp_path, data))


def test_running_without_pytest_benchmark_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_benchmark", None)
    with pytest.raises(ValueError, match=r"pip install -e '.\[test\]'"):
        micro.run("cpu", tmp_path)
