"""Cases on several processes (bench/ranks.py): the reductions, the runner with torchrun-launched
groups (a dead or hung rank fails its case only), two nodes, the plan and the command line. The
table6 smoke run on 2 processes that CI runs is tests/test_cli.py's end-to-end test."""

import json
import os
from pathlib import Path

import fake_suite
import pytest

from bench import cli, ranks, runner, session
from bench.gate import sources
from bench.metrics import Metric, count, peak, timing
from bench.runner import run_cases
from bench.suite import Case, Processes


def test_memory_reduces_to_the_largest_rank_and_other_counts_to_the_mean():
    assert ranks.reduce_metric([peak(100.0), peak(300.0)]) == Metric(300.0, "peak", "byte", per_rank=(100.0, 300.0))
    assert ranks.reduce_metric([count(10.0, "byte"), count(12.0, "byte")]).value == 12.0
    flops = ranks.reduce_metric([count(10.0, "flop"), count(14.0, "flop")])
    assert (flops.value, flops.per_rank, flops.kind, flops.unit) == (12.0, (10.0, 14.0), "count", "flop")


def test_a_step_takes_as_long_as_its_slowest_rank():
    fast, slow = timing([1.0, 5.0, 1.0]), timing([2.0, 2.0, 2.0])
    reduced = ranks.reduce_metric([fast, slow])
    assert reduced.samples == (2.0, 5.0, 2.0) and reduced.value == 2.0
    assert reduced.per_rank == (1.0, 2.0)  # each rank's median
    with pytest.raises(ValueError):
        ranks.slowest([[1.0, 2.0], [1.0]])  # ranks that took different numbers of steps


def test_measured_replies_keep_every_ranks_notes_the_first_failure_and_a_skip():
    def reply(rank, status="ok", error=None, notes=("same",)):
        return {"metrics": {"m": peak(float(rank)).to_json()}, "notes": [*notes, f"mine {rank}"], "status": status,
                "error": error, "cuda_peak_reserved_bytes": 10 * rank}

    reduced = ranks.reduce_measured([reply(0), reply(1, "skipped", "bad input")])
    assert reduced["notes"] == ["same", "mine 0", "rank 1: mine 1"]
    assert (reduced["status"], reduced["error"]) == ("skipped", "rank 1: bad input")
    assert reduced["metrics"]["m"]["per_rank"] == [0.0, 1.0] and reduced["cuda_peak_reserved_bytes"] == 10


def test_a_round_keeps_the_slowest_samples_and_each_ranks():
    reduced = ranks.reduce_round([{"samples": {"t": [1.0, 4.0]}}, {"samples": {"t": [3.0, 2.0]}}])
    assert reduced == {"samples": {"t": [3.0, 4.0]}, "rank_samples": {"t": [[1.0, 4.0], [3.0, 2.0]]}}


def test_per_rank_values_survive_the_results_file():
    metric = timing([1.0, 2.0], per_rank=(1.5, 1.2))
    assert Metric.from_json(json.loads(json.dumps(metric.to_json()))) == metric
    assert "per_rank" not in timing([1.0]).to_json()  # one-process files look as before


@pytest.fixture
def fake_suite_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the worker processes import fake_suite


@pytest.mark.slow
def test_cases_on_two_processes_a_dead_rank_and_a_hung_rank_fail_their_case_only(tmp_path, fake_suite_importable):
    def case(name, behaviour="", timeout_s=120.0):
        settings = fake_suite.Settings(name, str(tmp_path / "rounds.log"), behaviour, pids=str(tmp_path / f"{name}.pids"))
        return Case("fake", name, settings, group="g", rounds=2, timeout_s=timeout_s, nproc=2)

    # 45 s: the hung case must get past its build (two ranks importing torch on a busy machine) before
    # its rank 1 hangs in a round, or it times out before writing the pids the test checks.
    cases = [case("dead", "crash_rank1"), case("hung", "hang_rank1", timeout_s=45), case("A")]
    found = {r.case: r for r in run_cases(cases, {"fake": "fake_suite"}, "cpu")[0]}
    assert [found[n].status for n in ("dead", "hung", "A")] == ["error", "error", "ok"]
    a = found["A"]
    assert a.metrics["peak_bytes"].value == 200.0 and a.metrics["peak_bytes"].per_rank == (100.0, 200.0)
    assert a.metrics["answer_flops"] == Metric(42.0, "count", "flop", per_rank=(42.0, 42.0))
    work = a.metrics["work_time"]  # rank 1 takes twice as long in the fake suite: every step is its
    assert work.samples == (0.004, 0.004) and work.per_rank == (0.002, 0.004)
    assert a.notes == ["rank 0 of 2", "rank 1: rank 1 of 2"]
    assert "exitcode" in found["dead"].error and "timed out after 45 s" in found["hung"].error
    for pid in map(int, (tmp_path / "hung.pids").read_text().split()):  # both ranks gone, the stuck one too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # every rank runs each round: 2 rounds x 2 ranks
    assert (tmp_path / "rounds.log").read_text().split().count("A") == 4


def test_a_plan_on_several_processes_records_them_in_each_case(monkeypatch):
    p = session.plan(["table6"], "smoke", "cpu", nproc=2, only=["bn", "cbn"])
    assert [c.name for c in p.cases] == ["bn", "cbn"] and {c.nproc for c in p.cases} == {2}
    assert {c.processes for c in p.cases} == {Processes(2, "gloo", 1)}
    assert session.plan(["table6"], "smoke", "cpu").cases[0].processes == Processes()
    with pytest.raises(ValueError, match="--cases: no case rn in table6 at profile smoke; it has bn, gn"):
        session.plan(["table6"], "smoke", "cpu", only=["rn"])
    with pytest.raises(ValueError, match="at least 1"):
        session.plan(["table6"], "smoke", "cpu", nproc=0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ValueError, match="--nproc 2 on CUDA needs 2 GPUs"):
        ranks.check_nproc(2, "cuda")


def test_under_torchrun_the_command_line_says_how_to_launch_instead(monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert cli.main(["table6", "--profile", "smoke"]) == 2
    assert "python -m bench --nproc N" in capsys.readouterr().out


def test_the_gate_refuses_to_compare_different_process_counts():
    one = sources.Source("a", "s", "cpu", "cpu", "quick", ("t",), {})
    two = sources.Source("b", "s", "cpu", "cpu", "quick", ("t",), {}, world_size=2)
    with pytest.raises(sources.GateError, match="1 process\\(es\\) per case, the current b 2"):
        sources.check_comparable(one, two)


def free_port_pair() -> int:
    """A port p with p and p + 1 free now (the two cases of a group meet at p and p + 1)."""
    import socket

    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue


@pytest.mark.slow
def test_two_nodes_meet_per_case_and_node_0_gets_every_ranks_figures(tmp_path, fake_suite_importable):
    """Two "machines" on this one: node 1 follows node 0 through torchrun's static rendezvous."""
    import threading

    def case(name):
        return Case("fake", name, fake_suite.Settings(name, str(tmp_path / "rounds.log")), group="g", rounds=2,
                    timeout_s=120)

    cases = [case("A"), case("B")]
    port = free_port_pair()
    follower_failures = []
    follower = threading.Thread(target=lambda: follower_failures.extend(
        runner.follow_node_zero(cases, "cpu", ranks.Nodes(2, 1, "127.0.0.1", port))))
    follower.start()
    found = run_cases(cases, {"fake": "fake_suite"}, "cpu", nodes=ranks.Nodes(2, 0, "127.0.0.1", port))[0]
    follower.join(timeout=120)
    assert not follower.is_alive() and follower_failures == []
    assert [r.status for r in found] == ["ok", "ok"]
    assert found[0].metrics["peak_bytes"].per_rank == (100.0, 200.0)  # rank 1 ran on "node 1"
    assert found[0].notes == ["rank 0 of 2", "rank 1: rank 1 of 2"]


def test_nodes_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="needs --master-addr"):
        session.plan(["table6"], "smoke", "cpu", nodes=ranks.Nodes(2, 0))
    with pytest.raises(ValueError, match="--nnodes 2 --node-rank 2"):
        session.plan(["table6"], "smoke", "cpu", nodes=ranks.Nodes(2, 2, "host"))
    two = session.plan(["table6"], "smoke", "cpu", nproc=2, only=["bn"], nodes=ranks.Nodes(2, 0, "host", 29600))
    assert two.cases[0].processes == Processes(4, "gloo", 2)
    assert ranks.Nodes(2, 1, "host", 29600).rendezvous(1) == [
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "host", "--master-port", "29601"]
