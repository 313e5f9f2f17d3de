"""Training modes (bench/training_modes.py): how a mode is chosen, stored, named and kept apart."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import cli, codec, counts, flops, pytest_suites, training_modes
from bench.gate import sources
from bench.gate.sources import GateError
from bench.suite import load_suite
from bench.training_modes import Mode
from suites import classify, table6
from suites.constants import WINDOW
from suites.micro import LayerStep

ROOT = Path(__file__).resolve().parents[1]
MICRO_BASELINE = ROOT / "results" / "baselines" / "cpu" / "micro.json"


def test_a_mode_round_trips_through_suite_options_and_the_codec_and_names_itself():
    mode = Mode("bf16", channels_last=True, compile=True)
    assert Mode.from_options(mode.options()) == mode
    assert Mode.from_options({}) == Mode()  # the defaults: fp32, eager
    assert codec.decode(Mode, codec.encode(mode)) == mode
    assert mode.label == "bf16, channels_last, compiled" and Mode().label == "fp32, eager"
    assert mode.slug == "-bf16-channels_last-compiled" and Mode().slug == ""
    assert mode.flags == " --precision bf16 --channels-last --compile" and Mode().flags == ""
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Mode("fp8")


def test_a_compile_mode_and_fullgraph_travel_as_options_flags_and_names():
    mode = Mode(compile=True, compile_mode="max-autotune-no-cudagraphs", fullgraph=True)
    assert mode.options() == {"precision": "fp32", "channels_last": "off", "compile": "max-autotune-no-cudagraphs",
                              "fullgraph": "on"}
    assert Mode.from_options(mode.options()) == mode and codec.decode(Mode, codec.encode(mode)) == mode
    assert Mode.from_options({"compile": "on"}) == Mode(compile=True)  # files from before the compile modes
    assert mode.label == "fp32, compiled max-autotune-no-cudagraphs fullgraph"
    assert mode.slug == "-fp32-compiled-max-autotune-no-cudagraphs-fullgraph"
    assert mode.flags == " --compile max-autotune-no-cudagraphs --fullgraph"
    args = cli.parser().parse_args(["run", "classify", "--compile", "reduce-overhead", "--fullgraph"])
    assert training_modes.from_args(args) == Mode(compile=True, compile_mode="reduce-overhead", fullgraph=True)
    assert training_modes.from_args(cli.parser().parse_args(["run", "classify", "--compile"])) == Mode(compile=True)
    with pytest.raises(ValueError, match="needs compiling: add --compile"):
        training_modes.from_args(cli.parser().parse_args(["run", "classify", "--fullgraph"]))


def test_reduce_overhead_is_refused_on_cpu_with_the_reason():
    with pytest.raises(ValueError, match="reduce-overhead records CUDA graphs, which need a CUDA device"):
        classify.cases("smoke", "cpu", {"compile": "reduce-overhead"})
    assert {c.mode.compile_mode for c in classify.cases("smoke", "cuda", {"compile": "reduce-overhead"})} == {
        "reduce-overhead"}


@pytest.mark.parametrize("backend, mode, passed", [
    ("inductor", Mode(compile=True, compile_mode="max-autotune-no-cudagraphs", fullgraph=True),
     {"backend": "inductor", "fullgraph": True, "mode": "max-autotune-no-cudagraphs"}),
    ("inductor", Mode(compile=True), {"backend": "inductor", "fullgraph": False}),
    ("eager", Mode(compile=True, compile_mode="reduce-overhead"), {"backend": "eager", "fullgraph": False}),
])
def test_compiling_in_place_passes_the_mode_to_inductor_only(monkeypatch, backend, mode, passed):
    seen = {}
    module = nn.Linear(2, 2)
    monkeypatch.setattr(module, "compile", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(training_modes, "BACKEND", backend)
    mode.compile_in_place(module)
    assert seen == passed


def test_fp16_is_refused_on_cpu_with_the_fix():
    with pytest.raises(ValueError, match="use --precision bf16 on CPU"):
        table6.cases("smoke", "cpu", {"precision": "fp16"})
    assert all(c.mode == Mode("fp16") for c in table6.cases("smoke", "cuda", {"precision": "fp16"}))


def test_the_command_line_flags_reach_the_suites_that_take_a_mode():
    args = cli.parser().parse_args(["run", "table6", "classify", "--precision", "bf16", "--channels-last"])
    suites = {name: load_suite({"table6": "suites.table6", "classify": "suites.classify"}, name) for name in args.suites}
    options = cli.suite_options(args, suites)
    assert options["table6"] == options["classify"] == {"precision": "bf16", "channels_last": "on"}
    cases = classify.cases("smoke", "cpu", options["classify"])
    assert {c.mode for c in cases} == {Mode("bf16", channels_last=True)}
    gradpath_only = cli.parser().parse_args(["run", "gradpath", "--compile"])
    with pytest.raises(ValueError, match="no selected suite takes option 'compile'"):
        cli.suite_options(gradpath_only, {"gradpath": load_suite({"gradpath": "suites.gradpath"}, "gradpath")})


def test_stored_counts_serve_every_mode():
    """A FLOP count does not depend on autocast, memory format or compilation (counted eagerly)."""
    def key(case):
        return counts.key(codec.encode(case.settings), "2.15.0", "0.30.0", "abc")

    eager = {c.name: c for c in table6.cases("smoke", "cpu")}
    other = {c.name: c for c in table6.cases("smoke", "cpu", {"precision": "bf16", "channels_last": "on", "compile": "default"})}
    assert other["cbn"].mode != eager["cbn"].mode and key(other["cbn"]) == key(eager["cbn"])
    assert key(eager["cbn"]) != key(eager["bn"])


def micro_source(tmp_path: Path, mode: Mode) -> sources.Source:
    data = json.loads(MICRO_BASELINE.read_text())
    data["machine_info"]["cbn_bench"]["mode"] = mode.options()
    path = tmp_path / f"micro{mode.slug}.json"
    path.write_text(json.dumps(data))
    return sources.load_source(path)


def test_the_gate_compares_one_mode_with_the_same_mode_only(tmp_path):
    eager = sources.load_source(MICRO_BASELINE)  # written before modes: fp32, eager
    bf16 = micro_source(tmp_path, Mode("bf16"))
    assert eager.mode == Mode() and bf16.mode == Mode("bf16")
    assert sources.check_comparable(eager, micro_source(tmp_path, Mode())) == []
    with pytest.raises(GateError, match="ran in mode fp32, eager, the current .* in bf16, eager; .*"
                                        "python -m bench baseline --precision bf16 makes one"):
        sources.check_comparable(eager, bf16)
    assert pytest_suites.table(pytest_suites.load(bf16.path)).title == "Layer micro-benchmarks (bf16, eager)"
    folder = Path("results/baselines")
    assert sources.baseline_path(folder, pytest_suites.SCHEMA, "cpu", "cpu") == folder / "cpu" / "micro.json"
    assert sources.baseline_path(folder, "cbn-bench/results", "cpu", "quick", Mode("bf16")) == folder / "cpu" / "quick-bf16-eager.json"


def test_a_results_file_of_mixed_modes_is_refused(tmp_path):
    run = pytest_suites.load(MICRO_BASELINE)
    cases = [dataclasses.replace(c, mode=Mode(compile=i % 2 == 0)) for i, c in enumerate(run.cases)]
    with pytest.raises(GateError, match="several training modes"):
        sources.from_run(dataclasses.replace(run, cases=cases), "mixed.json", 1)


def test_a_layer_step_runs_in_bfloat16_channels_last_with_float32_statistics():
    step = LayerStep("cbn", (2, 8, 6, 6), torch.device("cpu"), mode=Mode("bf16", channels_last=True))
    step.fill_window()
    conv, norm = step.block
    assert step.x.is_contiguous(memory_format=torch.channels_last) and not step.x.is_contiguous()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert norm.history_mean.dtype == norm.history_grad_sq.dtype == torch.float32
    assert norm.window_entries == 4


def test_compiled_targets_are_compiled_in_place_after_measuring():
    """nn.Module.compile keeps the module tree (and state_dict keys) as they were."""
    case = next(c for c in classify.cases("smoke", "cpu", {"compile": "default"}) if c.settings.norm == "bn")
    workload = classify.build(case, "cpu")
    keys = list(workload.model.state_dict())
    assert workload.compile_targets() == [workload.model] and not workload.compiled
    workload.compile_now()
    assert workload.compiled and workload.model._compiled_call_impl is not None
    assert list(workload.model.state_dict()) == keys and isinstance(workload.model, nn.Module)


def test_a_channels_last_cbn_net_trains_as_the_contiguous_one():
    import copy

    from helpers import batches, cbn_layers, conv_cbn_net, train

    contiguous = conv_cbn_net(window=3)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    inputs = batches(5)
    want = train(contiguous, inputs)
    got = train(channels_last, [x.contiguous(memory_format=torch.channels_last) for x in inputs])
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(cbn_layers(contiguous), cbn_layers(channels_last)):
        torch.testing.assert_close(a.history_grad_sq, b.history_grad_sq, rtol=1e-5, atol=1e-6)
        assert a.slot_iterations == b.slot_iterations


@pytest.fixture
def quick_compile(monkeypatch):
    """Dynamo's capture without inductor's code generation: the harness's compiled path in seconds
    (inductor itself is tested on a small net in test_compile.py)."""
    import torch._dynamo

    monkeypatch.setattr(training_modes, "BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_micro_step_runs_compiled(quick_compile):
    step = LayerStep("cbn", (2, 8, 6, 6), torch.device("cpu"), mode=Mode(compile=True))
    step.fill_window()
    assert step.block._compiled_call_impl is not None and step.block[1].window_entries == 4


def table6_workload(options: dict, norm: str = "cbn"):
    case = next(c for c in table6.cases("smoke", "cpu", options) if c.name == norm)
    return table6.build(case, "cpu")


@pytest.mark.slow
def test_table6_measures_in_bfloat16_channels_last_at_smoke_size():
    workload = table6_workload({"precision": "bf16", "channels_last": "on"})
    measured = workload.measure()
    fp32 = table6_workload({})
    for _ in range(WINDOW + 2):  # as measure() runs before counting: the window full, then one step recording work
        fp32.train_step()
    fp32_flops = flops.counted_flops(fp32.train_step)
    assert measured.metrics["train_step_flops"].value == fp32_flops  # counts ignore precision
    norm = next(m for m in workload.model.modules() if hasattr(m, "history_bytes"))
    assert norm.history_mean.dtype == norm.history_grad_sq.dtype == torch.float32
    assert norm.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_table6_warms_up_and_times_compiled_at_smoke_size(quick_compile):
    workload = table6_workload({"compile": "default"})
    workload.warmup()  # what the worker runs after measuring: compiles, fills CBN's windows, runs the timed cycle
    timed = {name: samples[0] for name, samples in workload.timed_round(kept=1, discarded=0).items()}
    heads = workload.model.roi_heads
    compiled = [m for m in workload.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == [workload.model.backbone, heads.box_head, heads.mask_head]
    assert timed["train_step_time"] > 0 and timed["inference_time"] > 0
    census = {name: m.value for name, m in workload.compile_census().items()}
    # one graph per compiled stack, CBN's included (a second only if burn-in ended during the warm-up)
    assert census["graph_breaks"] == 0 and 3 <= census["compiled_graphs"] <= 6, census
    assert table6_workload({}).compile_census() == {}  # eager: nothing to count
