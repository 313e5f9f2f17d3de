"""`python -m bench profile`: valid gzipped traces and a Markdown report, CBN's own work grouped by
its labels (present for CBN, absent for BN), groups that add up to the profiled total."""

import gzip
import json
import types
from pathlib import Path

import pytest
import torch

from bench import cli, profiling
from cbn.layer import PROFILER_LABELS, profiled
from suites.workload import DETECTION_OPS


def event(name, self_us, parent=None):
    return types.SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent)


def test_each_operator_goes_to_the_innermost_cbn_label_else_its_kind():
    record = event("cbn::record_history", 1.0)
    statgrad = event("cbn::statistic_gradients", 2.0, record)
    events = [record, statgrad, event("cbn::conv_weight_grad", 30.0, statgrad), event("aten::abs", 4.0, record),
              event("aten::convolution", 50.0), event("aten::native_batch_norm", 7.0), event("torchvision::roi_align", 5.0),
              event("aten::binary_cross_entropy_with_logits", 3.0), event("aten::add_", 8.0)]
    summary = profiling.summarize(events, steps=2, cuda=False, op_groups={"detection ops (RoIAlign, NMS, losses)":
                                                                        DETECTION_OPS})
    assert summary["groups_ms"] == pytest.approx({
        "CBN statistic gradients": 0.016, "CBN record history": 0.0025, "convolutions": 0.025,
        "normalization kernels": 0.0035, "detection ops (RoIAlign, NMS, losses)": 0.004, "rest": 0.004})
    assert summary["total_ms"] == pytest.approx(sum(summary["groups_ms"].values()))
    assert summary["top"][0] == {"name": "aten::convolution", "self_ms": 0.025, "calls": 0.5}


def test_the_overhead_line_separates_the_norms_own_work_and_names_the_statistic_gradients():
    bn = {"total_ms": 100.0, "groups_ms": {"normalization kernels": 5.0, "convolutions": 95.0}}
    cbn = {"total_ms": 122.0, "groups_ms": {"CBN statistic gradients": 15.0, "CBN normalize": 5.0,
                                            "normalization kernels": 1.0, "convolutions": 101.0}}
    assert profiling.overhead(cbn, bn) == (
        "overhead = 22.0 ms per step (22.0% of the reference's step); the norm's own work 21.0 ms against 5.0 ms "
        "(+16.0 ms), of which the statistic-gradient convolutions are 15.0 ms (94%); everything else moved +6.0 ms")


def test_labels_exist_only_while_a_profiler_records():
    assert isinstance(profiled("cbn::normalize"), type(__import__("contextlib").nullcontext()))
    with torch.profiler.profile() as prof:
        with profiled("cbn::normalize"):
            torch.ones(2).add_(1)
    assert "cbn::normalize" in {e.name for e in prof.events()}
    assert "cbn::normalize" in PROFILER_LABELS


def check_report(folder: Path, norms: list[str]) -> dict:
    (report,) = folder.glob("*.json")
    data = json.loads(report.read_text())
    assert data["schema"] == profiling.SCHEMA and set(data["profiles"]) == set(norms)
    assert report.with_suffix(".md").read_text().startswith("# cbn-bench profile")
    for norm in norms:
        summary = data["profiles"][norm]["train"]
        trace = json.loads(gzip.decompress(Path(summary["trace"]).read_bytes()))
        assert trace["traceEvents"]  # opens in Perfetto / chrome://tracing
        assert sum(summary["groups_ms"].values()) <= summary["total_ms"] * (1 + 1e-9)
        cbn_groups = {g for g in summary["groups_ms"] if g.startswith("CBN ")}
        assert bool(cbn_groups) == (norm == "cbn"), (norm, cbn_groups)
    return data


def test_profiling_the_layer_step_writes_traces_and_a_report(tmp_path, capsys):
    assert cli.main(["profile", "--suite", "micro", "--steps", "1", "--out", str(tmp_path), "--memory"]) == 0
    data = check_report(tmp_path, ["bn", "cbn"])
    assert {"CBN statistic gradients", "CBN record history", "CBN normalize"} <= set(data["profiles"]["cbn"]["train"]["groups_ms"])
    out = " ".join(capsys.readouterr().out.split())
    assert "cbn: overhead = " in out and "the allocator snapshot is CUDA-only" in out
    (stored,) = tmp_path.glob("*.json")
    assert cli.main(["show", str(stored)]) == 0  # the report renders again from the stored file
    assert "where each train step's time goes" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_profiling_table6_at_smoke_size_against_bn(tmp_path):
    assert cli.main(["profile", "--profile", "smoke", "--steps", "1", "--inference", "--out", str(tmp_path),
                     "--device", "cpu"]) == 0
    data = check_report(tmp_path, ["bn", "cbn"])
    assert set(data["profiles"]["cbn"]) == {"train", "inference"}
    assert not any(g.startswith("CBN ") for g in data["profiles"]["cbn"]["inference"]["groups_ms"])  # eval is BN


def test_an_unknown_norm_is_a_usage_error(capsys):
    assert cli.main(["profile", "--suite", "micro", "--norm", "layernorm"]) == 2
    assert "the micro-benchmarks have no norm 'layernorm'" in capsys.readouterr().out


def test_the_layer_step_has_no_profiles_and_says_so(capsys):
    assert cli.main(["profile", "--suite", "micro", "--profile", "smoke"]) == 2
    assert "the micro-benchmarks have none" in " ".join(capsys.readouterr().out.split())
