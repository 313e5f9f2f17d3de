"""Each norm against BN, as table6 and classify report it: the derived ratios, the table cells, the
A/A control's check and the step-time over FLOP check, one definition for both suites.

A figure's subject is its case's name (table6's ``cbn``, classify's ``resnet18/cbn``), its reference
``ratio_to:bn``, BN of the same group: ids such as ``cbn/train_iter_per_s/ratio_to:bn``. Timed
ratios are paired by round (bench/stats.py's paired_ratio): both cases were timed in every round,
interleaved.

The A/A control is a second BN case, built and trained exactly as BN: its ratios to BN measure
nothing but the run's noise. Its figures ``bn_control/<quantity>_interval_deviation/ratio_to:bn``
are the farthest its 95% intervals reach from 1; a run whose control strays past the margin of
suites/constants.py (CONTROL_MARGIN) says so, and the gate fails it.
"""

from __future__ import annotations

import math

from bench import report
from bench.metrics import Metric
from bench.results import CaseResult, Derived, FigureId
from bench.stats import Summary, paired_ratio
from suites.constants import CONTROL, CONTROL_MARGIN

# timed metric -> (the quantity of its ratio's id, its label)
TIMED = {"train_step_time": ("train_iter_per_s", "train iter/s"), "inference_time": ("inference_iter_per_s", "inference iter/s")}
COUNTED = ("forward_macs", "train_step_flops")
TO_BN = "ratio_to:bn"


def ratio_id(suite: str, subject: str, quantity: str) -> FigureId:
    """The id of subject's quantity over BN's (quantity: "memory", a COUNTED metric or a TIMED quantity)."""
    return FigureId(suite, subject, quantity, TO_BN)


def deviation_id(suite: str, subject: str, quantity: str) -> FigureId:
    """The id of how far the A/A pair's interval of a TIMED quantity reaches from 1."""
    return FigureId(suite, subject, f"{quantity}_interval_deviation", TO_BN)


def step_time_over_flops_id(suite: str, subject: str) -> FigureId:
    return FigureId(suite, subject, "step_time_over_flops", TO_BN)


def _norm(subject: str) -> str:
    return subject.rsplit("/", 1)[-1]


def memory_metric(case: CaseResult) -> Metric | None:
    """What the memory column shows: the allocator peak on CUDA, the counted bytes on CPU (None: missing)."""
    m = case.metrics
    return m.get("peak_allocated_bytes", m.get("counted_total_bytes"))


def paired(numerator: CaseResult, denominator: CaseResult, metric: str) -> Summary:
    """numerator's metric over denominator's, paired by the round each sample was taken in."""
    def rounds(case: CaseResult) -> dict[int, list[float]]:
        return case.metrics[metric].by_round(case.sampling.get("kept_per_round", 1))

    return paired_ratio(rounds(numerator), rounds(denominator))


def to_bn(suite: str, case: CaseResult, bn: CaseResult) -> list[Derived]:
    """Memory, MAC, FLOP and iter/s ratios of one norm's case to BN's (iter/s with paired 95%
    intervals); a figure whose metric is missing on either side is left out."""
    out = []
    subject, norm = case.case, _norm(case.case)
    mem, mem_bn = memory_metric(case), memory_metric(bn)
    if mem is not None and mem_bn is not None:
        out.append(Derived(ratio_id(suite, subject, "memory"), f"{norm}/bn memory ratio", mem.value / mem_bn.value,
                           kind=mem.kind))
    for metric in COUNTED:
        if metric in case.metrics and metric in bn.metrics:
            out.append(Derived(ratio_id(suite, subject, metric), f"{norm}/bn {metric} ratio",
                               case.metrics[metric].value / bn.metrics[metric].value))
    for timed, (quantity, label) in TIMED.items():
        if timed in case.metrics and timed in bn.metrics:
            r = paired(bn, case, timed)  # iter/s ratio = BN time / norm time
            out.append(Derived(ratio_id(suite, subject, quantity), f"{norm}/bn {label} ratio", r.median, r.ci_low,
                               r.ci_high, kind="timing", note=f"paired over {r.n} rounds"))
    return out


def control_checks(suite: str, control: CaseResult, bn: CaseResult) -> list[Derived]:
    """How far the A/A pair's 95% intervals reach from 1, per timed figure (nan with one round)."""
    out = []
    for timed, (quantity, label) in TIMED.items():
        if timed in control.metrics and timed in bn.metrics:
            r = paired(bn, control, timed)
            out.append(Derived(deviation_id(suite, control.case, quantity), f"A/A control: BN/BN {label} interval deviation",
                               max(abs(r.ci_low - 1), abs(r.ci_high - 1)), kind="timing",
                               note=f"A/A: BN against a second BN, paired over {r.n} rounds"))
    return out


def control_caption(suite: str, group: str, derived: dict[FigureId, Derived], device: str) -> list[str]:
    """The A/A control's verdict, one line per timed figure; group: "" (table6) or the model's name
    and a slash (classify's "resnet18/")."""
    margin = CONTROL_MARGIN["cpu" if device == "cpu" else "cuda"]
    lines = []
    for quantity, label in TIMED.values():
        check = derived.get(deviation_id(suite, group + CONTROL, quantity))
        ratio = derived.get(ratio_id(suite, group + CONTROL, quantity))
        if check is None or ratio is None:
            continue
        within = not math.isnan(check.value) and check.value <= margin
        verdict = ("within" if within else "OUTSIDE") + f" the +-{100 * margin:.0f}% margin on {device}"
        tail = "" if within else ": this run's noise is too large for its ratios to mean anything"
        lines.append(f"A/A control, {label}: BN/BN = {report.fmt_ratio(ratio.value, ratio.ci_low, ratio.ci_high)}, "
                     f"{verdict}{tail}")
    return lines


def step_time_over_flops(suite: str, cbn: CaseResult, bn: CaseResult) -> list[Derived]:
    """CBN's time ratio to BN over its training-FLOP ratio: 1 when its extra time is its extra FLOPs.
    With the time ratio's paired 95% interval (the FLOP ratio is exact); none when a figure is missing."""
    needed = ("train_step_time", "train_step_flops")
    if not all(n in cbn.metrics and n in bn.metrics for n in needed):
        return []
    time_ratio = paired(cbn, bn, "train_step_time")
    flop_ratio = cbn.metrics["train_step_flops"].value / bn.metrics["train_step_flops"].value
    return [Derived(step_time_over_flops_id(suite, cbn.case), "cbn/bn step-time ratio over training-FLOP ratio",
                    time_ratio.median / flop_ratio, time_ratio.ci_low / flop_ratio, time_ratio.ci_high / flop_ratio,
                    kind="timing")]


def cells(case: CaseResult, derived: dict[FigureId, Derived]) -> list[str]:
    """memory, fwd GMAC, train-step GFLOP, train iter/s and infer iter/s, each with its ratio to BN
    ("missing" where the metric could not be measured; CaseResult.missing says why)."""
    m = case.metrics
    suite = case.suite

    def ratio(quantity: str) -> str:
        d = derived.get(ratio_id(suite, case.case, quantity))
        return "1" if _norm(case.case) == "bn" else ("-" if d is None else report.fmt_ratio(d.value, d.ci_low, d.ci_high))

    def cell(metric: str, text) -> str:
        return f"{text()} ({ratio(metric)})" if metric in m else "missing"

    memory = memory_metric(case)
    return [
        "missing" if memory is None else f"{report.fmt_bytes(memory.value)} ({ratio('memory')})",
        cell("forward_macs", lambda: report.fmt(m["forward_macs"].value / 1e9, 4)),
        cell("train_step_flops", lambda: report.fmt(m["train_step_flops"].value / 1e9, 4)),
        f"{report.fmt(1 / m['train_step_time'].value)} ({ratio('train_iter_per_s')})",
        f"{report.fmt(1 / m['inference_time'].value)} ({ratio('inference_iter_per_s')})",
    ]


def census_lines(cases: list[CaseResult], label) -> list[str]:
    """The compile census of a compiled run, one line for every case that has one."""
    found = [(label(c), c.metrics) for c in cases if "compiled_graphs" in c.metrics]
    if not found:
        return []
    cells = "; ".join(f"{name} {m['compiled_graphs'].value:.0f} / {m['graph_breaks'].value:.0f} / "
                      f"{m['compiled_frames'].value:.0f} / {m['recompiles'].value:.0f}" for name, m in found)
    return [f"compile census over the warm-up (graphs / graph breaks / compiled frames / recompiles): {cells}"]


def missing_lines(cases: list[CaseResult], label) -> list[str]:
    """Caption lines naming each metric a case could not measure, and why."""
    return [f"{label(c)}: {metric} missing ({why})" for c in cases for metric, why in c.missing.items()]


def failed_cells(case: CaseResult) -> list[str]:
    why = case.error or (case.notes[0] if case.status == "skipped" and case.notes else "")
    reason = why.splitlines()[0][:80] if why else ""
    return [f"{case.status}: {reason}", "", "", "", ""]


COLUMNS = ["memory (xBN)", "fwd GMAC (xBN)", "train-step GFLOP (xBN)", "train iter/s (xBN [95% CI])",
           "infer iter/s (xBN [95% CI])"]


def verdict(check: Derived, target: float, device: str, enforced: bool = True) -> str:
    side = "within" if check.value <= target else "ABOVE"
    how = "which the gate enforces too" if enforced else "a goal; the gate holds the ratio to its baseline"
    interval = "" if check.ci_low is None else f" [95% CI {check.ci_low:.3f}-{check.ci_high:.3f}]"
    return (f"CBN/BN step-time ratio / training-FLOP ratio = {check.value:.3f}{interval} "
            f"({side} the {target:.2f} target on {device}, {how})")


def sampling_text(cases: list[CaseResult], device: str) -> str:
    how = next((c.sampling for c in cases if c.sampling), {})
    if not how:
        return "sampling not recorded"
    text = (f"each round a block of {how['discarded_per_round']} discarded + {how['kept_per_round']} kept training "
            f"steps, then a block of as many inference calls; order {how['order']}")
    return text + (f"; CUDA caches {how['cuda_cache']}" if device.startswith("cuda") else "")


def samples(cases: list[CaseResult]) -> int:
    return max((len(c.metrics["train_step_time"].samples) for c in cases if "train_step_time" in c.metrics), default=0)


def rounds(cases: list[CaseResult]) -> int:
    return max((len(set(c.metrics["train_step_time"].by_round(c.sampling.get("kept_per_round", 1))))
                for c in cases if "train_step_time" in c.metrics), default=0)
