"""The command line: usage errors exit 2 with a clear message; a smoke run writes JSON, Markdown, PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli, results, session

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "unknown suite 'nosuch'; available: table6, gradpath"),
    (["gradpath", "--profile", "huge"], "suite 'gradpath' has no profile 'huge'"),
    (["gradpath", "--set", "placement=all"], "no selected suite takes option 'placement'"),
    (["table6", "--placement", "everywhere"], "table6 option placement='everywhere'"),
    (["gradpath", "--rounds", "0"], "--rounds must be at least 1"),
])
def test_usage_errors_exit_2_and_say_why(args, message, capsys):
    assert cli.main(args) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_show_refuses_a_foreign_file(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert cli.main(["show", str(path)]) == 2
    assert "not a cbn-bench results file" in capsys.readouterr().out


def test_help_lists_the_options():
    out = bench("run", "--help").stdout
    for option in ("--profile", "--device", "--rounds", "--out", "--compare", "--placement"):
        assert option in out


@pytest.mark.slow
def test_smoke_runs_write_results_compare_and_gate(tmp_path):
    """table6 on several processes: BN and CBN, each case on 2 gloo processes (tools/gpu-run's
    end-to-end test runs it in one process); then gradpath, compared and gated."""
    first = bench("table6", "--profile", "smoke", "--rounds", "1", "--nproc", "2", "--cases", "bn,cbn", "--out",
                  str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]  # the runner alone writes, journal removed
    json_path = next(tmp_path.glob("*.json"))
    run = results.load(json_path)
    assert [(c.case, c.status, c.processes.world_size, c.processes.backend) for c in run.cases] == [
        ("bn", "ok", 2, "gloo"), ("cbn", "ok", 2, "gloo")]
    assert "Table 6, profile smoke" in first.stdout and "results written to" in first.stdout
    report = json_path.with_suffix(".md").read_text()
    assert "2 processes (gloo)" in report and "DistributedDataParallel" in report
    case = {c.case: c.metrics for c in run.cases}
    cbn, bn = case["cbn"], case["bn"]
    assert cbn["train_step_flops"].value > bn["train_step_flops"].value
    assert cbn["inference_forward_macs"].value == bn["inference_forward_macs"].value
    assert cbn["cbn_history_bytes"].value > 0
    assert {(m.kind, m.unit) for m in (cbn["train_step_flops"], cbn["counted_total_bytes"], cbn["peak_rss_bytes"])} == {
        ("count", "flop"), ("count", "byte"), ("peak", "byte")}
    assert len(cbn["train_step_time"].samples) == 1 and cbn["train_step_time"].kind == "timing"
    assert all(len(m.per_rank) == 2 for m in (cbn["peak_rss_bytes"], cbn["train_step_time"], cbn["train_step_flops"]))

    shown = bench("show", str(json_path))
    assert shown.returncode == 0 and "Table 6, profile smoke" in shown.stdout

    second = bench("gradpath", "--profile", "smoke", "--rounds", "1", "--out", str(tmp_path), "--compare", str(json_path))
    assert second.returncode == 0, second.stdout[-3000:]
    assert "comparison with the previous run" in second.stdout and "Statistic-gradient paths" in second.stdout
    baseline = next(p for p in tmp_path.glob("*.json") if p != json_path)  # the first run was not overwritten
    assert baseline.with_name(baseline.stem + "_gradpath.png").exists()
    gradpath = {c.case: c.metrics for c in results.load(baseline).cases}
    assert gradpath["naive-3x3-C16"]["max_relative_difference_to_efficient"].value < 1e-3

    # The gate measures gradpath again and judges it against the second run as its baseline.
    rules = tmp_path / "thresholds.toml"
    rules.write_text('[gradpath]\n"*.stored_bytes_per_step" = "== baseline"\n'
                     '"naive-3x3-C16/stat_grad_time/ratio_to:efficient" = ">= 1"\n')
    gate = bench("gate", "gradpath", "--profile", "smoke", "--baseline", str(baseline), "--thresholds", str(rules),
                 "--out", str(tmp_path / "gate"))
    assert gate.returncode == 0, gate.stdout[-3000:] + gate.stderr[-3000:]
    assert "gate passed" in gate.stdout and "gradpath.naive-3x3-C16.stored_bytes_per_step" in gate.stdout


def test_an_unwritable_output_folder_is_refused_before_measuring(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert cli.main(["gradpath", "--profile", "smoke", "--out", str(blocked / "runs")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"cannot write results to {blocked / 'runs'}" in out and "--out" in out
    assert "building" not in out  # nothing was measured


def test_a_comparison_file_of_another_profile_is_refused_before_measuring(capsys):
    quick = ROOT / "results" / "baselines" / "cpu" / "quick.json"
    assert cli.main(["gradpath", "--profile", "smoke", "--device", "cpu", "--compare", str(quick)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "--compare: the previous run is profile 'quick'" in out and "building" not in out


def test_gate_usage_errors_exit_2(capsys):
    assert cli.main(["gate", "table6", "--results", "x.json"]) == 2
    assert "not both" in capsys.readouterr().out
    assert cli.main(["gate", "nosuch"]) == 2
    assert "unknown suite 'nosuch'; available: table6, gradpath, classify, statistics, quality, micro" in capsys.readouterr().out


def test_the_help_lists_the_profiles_and_options_the_suites_declare(monkeypatch, capsys):
    import types

    declared = types.ModuleType("declared_suite")
    fake = session.load_suite({"fake": "fake_suite"}, "fake")
    for name in ("default_profile", "cases", "build", "derive", "tables", "figures", "COUNTS", "SETTINGS"):
        setattr(declared, name, getattr(fake, name))
    declared.NAME, declared.PROFILES = "declared", {"tiny": fake.PROFILES["smoke"], "huge": fake.PROFILES["smoke"]}
    declared.OPTIONS = {"flavour": ("sweet", "sour")}
    monkeypatch.setitem(sys.modules, "declared_suite", declared)
    monkeypatch.setattr(session, "suite_registry", lambda: {"declared": "declared_suite"})
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sizes to run at: tiny, huge" in text
    assert "--flavour FLAVOUR declared: sweet or sour (default sweet); same as --set flavour=..." in text
