"""The prepared GPU commands (tools/gpu_run.py), tested where CI runs: set-up (wheels, deep imports,
no GPU), packing into at most three files, the deadline, SIGINT and recovery, and both commands end
to end on a CPU at smoke size. Nothing here depends on the machine's speed: a deadline test stops a
step that would sleep far past it, and SIGINT is sent when the journal records its first finished group."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_run  # noqa: E402  (tools/ is not a package)


def test_without_a_gpu_it_stops_at_once_saying_what_to_do(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device.*--device cpu --profile smoke"):
        gpu_run.main(["table6", "--out", str(tmp_path)])


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


def test_the_install_step_puts_carried_wheels_first_and_checks_every_import_deeply(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "carried_only_here")
    monkeypatch.setattr(gpu_run, "SITE", tmp_path / "site")
    monkeypatch.setattr(gpu_run, "REQUIRED", ("torch", "carried_only_here", "fvcore.nn"))
    monkeypatch.setattr(gpu_run, "OPTIONAL", {"no_such_optional_thing": "no such figures"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    assert gpu_run.install(wheels) == ["no_such_optional_thing missing: no such figures"]
    assert (tmp_path / "site" / "carried_only_here.py").exists()
    assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)  # for the worker processes too
    monkeypatch.setattr(gpu_run, "REQUIRED", ("fvcore.no_such_module",))  # fvcore itself imports: deep or nothing
    with pytest.raises(SystemExit, match="missing packages: fvcore.no_such_module"):
        gpu_run.install(wheels)
    with pytest.raises(SystemExit, match="no wheels in"):
        gpu_run.install(tmp_path)
    monkeypatch.setattr(gpu_run, "REQUIRED", ())
    monkeypatch.setattr(gpu_run, "MIN_TORCH", (99, 0))
    with pytest.raises(SystemExit, match="older than 99.0"):
        gpu_run.install(None)


def runner(tmp_path: Path, deadline_s: float = 60.0, grace_s: float = 5.0) -> gpu_run.Runner:
    args = Namespace(out=tmp_path / "out", work=tmp_path / "work", grace_s=grace_s)
    args.out.mkdir()
    (args.work / "results" / "runs").mkdir(parents=True)
    return gpu_run.Runner(args, gpu_run.Summary("table6", "cpu", "smoke", "test-run-id", deadline_s))


def test_a_step_the_deadline_leaves_no_time_for_is_skipped_and_said_so(tmp_path):
    r = runner(tmp_path, deadline_s=10.0)
    r.run(gpu_run.Step("long pass", [sys.executable, "-c", "raise SystemExit(3)"]), need_s=1e6)
    (step,) = r.summary.steps
    assert step.status == "skipped" and step.exit_code is None and "too little" in step.why
    assert "skipping long pass" in (tmp_path / "out" / "gpu-run-table6.log").read_text()


def test_a_step_past_the_deadline_is_interrupted_and_the_rest_skipped(tmp_path):
    r = runner(tmp_path, deadline_s=1.0, grace_s=30.0)  # the sleeper would run 60 s
    sleeper = [sys.executable, "-c", "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    raise SystemExit(130)"]
    r.run(gpu_run.Step("sleeper", sleeper))
    r.run(gpu_run.Step("after", [sys.executable, "-c", "pass"]))
    first, after = r.summary.steps
    assert (first.status, r.summary.stopped) == ("interrupted", "deadline") and first.exit_code != 0
    assert after.status == "skipped" and after.why == "stopped by deadline"
    summary = json.loads((tmp_path / "out" / "gpu-run-table6.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["interrupted", "skipped"]


def test_packing_keeps_at_most_three_files_and_drops_traces_past_the_size_limit(tmp_path, monkeypatch):
    r = runner(tmp_path)
    results = tmp_path / "work" / "results"
    (results / "runs" / "x_smoke_cpu.json").write_text("{}")
    (results / "profiles").mkdir()
    (results / "profiles" / "p_bn_train.trace.json.gz").write_bytes(os.urandom(200_000))
    monkeypatch.setattr(gpu_run, "MAX_ARCHIVE_BYTES", 100_000)
    r.pack()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu-run-table6.json", "gpu-run-table6.log", "gpu-run-table6.tar.gz"]
    with tarfile.open(tmp_path / "out" / "gpu-run-table6.tar.gz") as tar:
        names = tar.getnames()
    assert "results/runs/x_smoke_cpu.json" in names and "results/runs/gpu-run-table6.log" in names
    assert "results/runs/gpu-run-table6.json" in names
    assert not any("trace" in n for n in names)
    summary = json.loads((tmp_path / "out" / "gpu-run-table6.json").read_text())
    assert summary["left_out"] == ["results/profiles/p_bn_train.trace.json.gz (archive over 0 MiB)"]


def gpu_run_command(command: str, tmp_path: Path, *extra: str) -> list[str]:
    return [str(ROOT / "tools" / "gpu-run"), command, "--device", "cpu", "--profile", "smoke",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra]


def wrapper_env() -> dict[str, str]:
    return dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


def archive_names(tmp_path: Path, command: str) -> list[str]:
    with tarfile.open(tmp_path / "out" / f"gpu-run-{command}.tar.gz") as tar:
        return tar.getnames()


@pytest.mark.slow
def test_the_table6_command_runs_end_to_end_on_a_cpu_and_brings_back_three_files(tmp_path):
    done = subprocess.run(gpu_run_command("table6", tmp_path, "--deadline-s", "100000", "--rounds", "2",
                                          "--cases", "bn,cbn"), cwd=ROOT, capture_output=True,
                          text=True, timeout=3600, env=wrapper_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "out").iterdir())) == 3
    summary = json.loads((tmp_path / "out" / "gpu-run-table6.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("layer CUDA tests", "ok"), ("table6", "ok")]
    names = archive_names(tmp_path, "table6")
    (run_name,) = [n for n in names if n.startswith("results/runs/") and "_smoke_" in n and n.endswith(".json")]
    assert run_name.removesuffix(".json") + ".md" in names
    with tarfile.open(tmp_path / "out" / "gpu-run-table6.tar.gz") as tar:
        run = json.load(tar.extractfile(run_name))
    assert [(c["case"], c["status"]) for c in run["cases"]] == [("bn", "ok"), ("cbn", "ok")]
    assert len({json.dumps(c["work"], sort_keys=True) for c in run["cases"]}) == 1  # the same boxes for every norm


def journal_lines(tmp_path: Path) -> int:
    return sum(len(j.read_text().splitlines()) for j in (tmp_path / "work" / "results" / "runs").glob(".*.journal.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("grace_s", ["30", "0"], ids=["written-by-the-run", "recovered-from-the-journal"])
def test_sigint_keeps_every_finished_group_and_leaves_no_worker_behind(tmp_path, grace_s):
    proc = subprocess.Popen(gpu_run_command("rest", tmp_path, "--skip-micro", "--deadline-s", "100000",
                                            "--grace-s", grace_s),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=wrapper_env())
    try:
        while journal_lines(tmp_path) < 3:  # the header and gradpath's first group (two cases): an event, not a timer
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu-run-rest.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["gradpath baseline"] == "interrupted" and summary["stopped"] == "SIGINT"
    assert statuses["table6 in bf16 + channels_last"] == statuses["profile CBN against BN"] == "skipped"
    assert gpu_run.kill_workers(summary["run_id"]) == []  # nothing of the run is left to kill
    runs = [n for n in archive_names(tmp_path, "rest") if n.endswith(".json") and "_smoke_" in n]
    assert len(runs) == 1
    with tarfile.open(tmp_path / "out" / "gpu-run-rest.tar.gz") as tar:
        run = json.load(tar.extractfile(runs[0]))
    assert sum(c["status"] == "ok" for c in run["cases"]) >= 2  # the group the journal had recorded
    assert not list((tmp_path / "work" / "results" / "runs").glob(".*.journal.jsonl"))  # recovered or removed
