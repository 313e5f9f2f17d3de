"""The prepared GPU command (tools/gpu_run.py), tested where CI runs: its plan and time estimate,
the install step against a folder of wheels, a clear stop without a GPU, and a CPU run at smoke size."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_run  # noqa: E402  (tools/ is not a package)

from bench import session  # noqa: E402


def test_the_paper_plan_fits_the_gpu_budget_and_says_how():
    plan = session.plan(["table6", "gradpath"], "paper", "cpu")  # the same cases as on CUDA
    seconds, lines = gpu_run.estimate(plan.cases, set(), "cuda", with_micro=True)
    assert seconds <= gpu_run.BUDGET_S
    assert lines[0].startswith("SyncBN on one device probe")
    assert lines[1].startswith("table6: 6 cases, 6 rounds of 1 discarded + 2 kept steps, stored counts for 0")
    assert lines[2].startswith("gradpath: 16 cases")
    known = {("table6", c.name) for c in plan.cases if c.suite == "table6"}
    faster, _ = gpu_run.estimate(plan.cases, known, "cuda", with_micro=True)
    assert seconds - faster == pytest.approx(6 * gpu_run.COSTS["cuda"].count_s)  # stored counts save the counting


def test_a_plan_over_the_budget_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit, match="over the budget of 60 s"):
        gpu_run.main(["--device", "cpu", "--profile", "paper", "--budget-s", "60", "--dry-run"])


def test_without_a_gpu_it_stops_at_once_saying_what_to_do(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device.*--device cpu --profile smoke"):
        gpu_run.main([])


def wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding one module, `name`."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "ANSWER = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_the_install_step_puts_carried_wheels_first_and_checks_every_import(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "carried_only_here")
    monkeypatch.setattr(gpu_run, "SITE", tmp_path / "site")
    monkeypatch.setattr(gpu_run, "NEEDED", ("torch", "carried_only_here"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    gpu_run.install(wheels)
    assert (tmp_path / "site" / "carried_only_here.py").exists()
    assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)  # for the worker processes too
    monkeypatch.setattr(gpu_run, "NEEDED", ("no_such_package_anywhere",))
    with pytest.raises(SystemExit, match="missing packages: no_such_package_anywhere"):
        gpu_run.install(wheels)
    with pytest.raises(SystemExit, match="no wheels in"):
        gpu_run.install(tmp_path)


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_a_cpu_at_smoke_size(tmp_path):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # the wrapper runs python3
    done = subprocess.run([str(ROOT / "tools" / "gpu-run"), "--device", "cpu", "--profile", "smoke", "--skip-micro",
                           "--out", str(tmp_path / "runs"), "--baselines", str(tmp_path / "baselines"),
                           "--profiles", str(tmp_path / "profiles")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, PATH=path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu-run plan on cpu" in done.stdout and "estimated total" in done.stdout
    assert "sync check, one CBN training step on cpu: no host synchronization" in done.stdout
    assert "syncbn probe: gloo, 2 processes on one cpu device: fails: ValueError: SyncBatchNorm expected input" in done.stdout
    assert (tmp_path / "baselines" / "cpu" / "smoke.json").exists()
    assert (tmp_path / "baselines" / "cpu" / "smoke-bf16-channels_last-eager.json").exists()  # time was left for it
    assert len(list((tmp_path / "runs").glob("*_smoke_*.json"))) == 2
    assert "profiling CBN against BN" in done.stdout  # time was left within the budget
    assert len(list((tmp_path / "profiles").glob("*_table6_smoke_*.md"))) == 1


def test_the_sync_check_passes_for_cbn_and_names_a_sync_when_there_is_one(monkeypatch, capsys):
    assert gpu_run.sync_check("cpu")
    from cbn import layer

    original = layer.CrossIterationBatchNorm2d._record

    def record_and_sync(self, *args):
        original(self, *args)
        bool(self.nonfinite_batches)  # what the layer did before: ask the host about the batch

    monkeypatch.setattr(layer.CrossIterationBatchNorm2d, "_record", record_and_sync)
    assert not gpu_run.sync_check("cpu")
    assert "FAILED: 1 host syncs" in capsys.readouterr().out
