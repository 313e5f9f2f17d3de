"""CBN under DistributedDataParallel: two CPU processes with gloo, launched by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_two_ranks(tmp_path: Path, variant: str = "") -> dict:
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "ddp_cbn_worker.py"), str(out), variant],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_each_rank_keeps_its_own_window_under_ddp(tmp_path):
    report = run_two_ranks(tmp_path)
    assert report["iterations"] == [3, 3]  # one window entry per optimizer step on every rank
    assert report["slots"][0] == report["slots"][1] == [2, 3]
    assert report["parameters_equal_across_ranks"]
    assert not report["older_slot_equal_across_ranks"]
    assert max(report["own_mean_error"]) < 1e-5  # each rank's entry is its own batch's mean


@pytest.mark.slow
def test_without_the_ignore_list_ddp_would_hand_every_rank_rank_0s_history(tmp_path):
    """Why cbn.convert marks the history (DDP's default broadcast_buffers=True)."""
    report = run_two_ranks(tmp_path, "broadcast")
    assert report["older_slot_equal_across_ranks"]
    assert max(report["own_mean_error"]) > 1e-3  # rank 1 holds rank 0's mean
