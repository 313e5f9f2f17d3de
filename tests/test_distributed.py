"""CBN under DistributedDataParallel: two CPU processes with gloo, launched by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import batches, cbn_layers, conv_cbn_net, train

import cbn

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
    assert report["iterations"] == [4, 4]  # one iteration per optimizer step on every rank, four steps
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


@pytest.mark.slow
def test_a_run_resumed_from_a_rank_0_checkpoint_continues_exactly_on_every_rank(tmp_path):
    report = run_two_ranks(tmp_path, "resume")
    assert report["resumed_difference"] == [0.0, 0.0]  # outputs of 3 more steps, bit for bit


@pytest.mark.slow
def test_without_the_per_rank_history_rank_1_would_resume_with_rank_0s_window(tmp_path):
    report = run_two_ranks(tmp_path, "resume_rank0_only")
    assert report["resumed_difference"][1] > 1e-3  # (then rank 0 too, through the averaged gradients)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_per_rank_state_is_each_layers_history_keyed_as_in_the_state_dict(one_rank_group):
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    state = cbn.per_rank_state(net)
    assert {"1.history_mean", "1.history_grad_sq", "1.nonfinite_batches", "4.history_var"} <= set(state)
    assert all(torch.equal(state[k], net.state_dict()[k]) for k in state if k in net.state_dict())
    shares = cbn.gather_per_rank_state(net)
    fresh = conv_cbn_net(window=3)
    fresh.load_state_dict(net.state_dict())
    cbn_layers(fresh)[0].history_mean.zero_()
    cbn.load_per_rank_state(fresh, shares)
    assert torch.equal(cbn_layers(fresh)[0].history_mean, cbn_layers(net)[0].history_mean)


def test_per_rank_state_of_another_world_size_or_model_is_refused(one_rank_group):
    net = conv_cbn_net(window=3)
    train(net, batches(3))
    share = cbn.per_rank_state(net)
    with pytest.raises(ValueError, match="CBN history of 2 processes and this job has 1"):
        cbn.load_per_rank_state(net, [share, share])
    with pytest.raises(ValueError, match="'9.history_mean', which this model lacks"):
        cbn.load_per_rank_state(net, [{"9.history_mean": share["1.history_mean"]}])
