"""Each norm against BN, as table6 and classify report it: the derived ratios, the table cells and
the step-time over FLOP check, one definition for both suites.

Derived names are ``<prefix><norm>/bn <what> ratio``; table6 uses no prefix, classify the model's
name and a dot (``resnet18.cbn/bn train iter/s ratio``).
"""

from __future__ import annotations

from bench import report
from bench.metrics import Metric
from bench.results import CaseResult, Derived
from bench.stats import ratio_of_medians
from suites.constants import STEP_TIME_OVER_FLOPS

TIMED = (("train_step_time", "train iter/s"), ("inference_time", "inference iter/s"))


def memory_metric(case: CaseResult) -> Metric:
    """What the memory column shows: the allocator peak on CUDA, the counted bytes on CPU."""
    m = case.metrics
    return m["peak_allocated_bytes"] if "peak_allocated_bytes" in m else m["counted_total_bytes"]


def to_bn(suite: str, prefix: str, name: str, case: CaseResult, bn: CaseResult) -> list[Derived]:
    """Memory, MAC, FLOP and iter/s ratios of one norm's case to BN's (iter/s with bootstrap CIs)."""
    mem, mem_bn = memory_metric(case), memory_metric(bn)
    out = [Derived(suite, f"{prefix}{name}/bn memory ratio", mem.value / mem_bn.value, kind=mem.kind)]
    for metric in ("forward_macs", "train_step_flops"):
        out.append(Derived(suite, f"{prefix}{name}/bn {metric} ratio", case.metrics[metric].value / bn.metrics[metric].value))
    for timed, label in TIMED:
        r = ratio_of_medians(bn.metrics[timed].samples, case.metrics[timed].samples)  # iter/s ratio = BN time / norm time
        out.append(Derived(suite, f"{prefix}{name}/bn {label} ratio", r.median, r.ci_low, r.ci_high, kind="timing"))
    return out


def step_time_over_flops(suite: str, prefix: str, cbn: CaseResult, bn: CaseResult) -> Derived:
    """CBN's time ratio to BN over its training-FLOP ratio: 1 when its extra time is its extra FLOPs.
    With the time ratio's bootstrap 95% interval (the FLOP ratio is exact)."""
    time_ratio = ratio_of_medians(cbn.metrics["train_step_time"].samples, bn.metrics["train_step_time"].samples)
    flop_ratio = cbn.metrics["train_step_flops"].value / bn.metrics["train_step_flops"].value
    return Derived(suite, prefix + STEP_TIME_OVER_FLOPS, time_ratio.median / flop_ratio, time_ratio.ci_low / flop_ratio,
                   time_ratio.ci_high / flop_ratio, kind="timing")


def cells(case: CaseResult, name: str, prefix: str, derived: dict[str, Derived]) -> list[str]:
    """memory, fwd GMAC, train-step GFLOP, train iter/s and infer iter/s, each with its ratio to BN."""
    m = case.metrics

    def ratio(metric: str) -> str:
        d = derived.get(f"{prefix}{name}/bn {metric} ratio")
        return "1" if name == "bn" else ("-" if d is None else report.fmt_ratio(d.value, d.ci_low, d.ci_high))

    return [
        f"{report.fmt_bytes(memory_metric(case).value)} ({ratio('memory')})",
        f"{report.fmt(m['forward_macs'].value / 1e9, 4)} ({ratio('forward_macs')})",
        f"{report.fmt(m['train_step_flops'].value / 1e9, 4)} ({ratio('train_step_flops')})",
        f"{report.fmt(1 / m['train_step_time'].value)} ({ratio('train iter/s')})",
        f"{report.fmt(1 / m['inference_time'].value)} ({ratio('inference iter/s')})",
    ]


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
    text = f"{how['kept_per_round']} kept per round after {how['discarded_per_round']} discarded, order {how['order']}"
    return text + (f"; CUDA caches {how['cuda_cache']}" if device.startswith("cuda") else "")


def samples(cases: list[CaseResult]) -> int:
    return max((len(c.metrics["train_step_time"].samples) for c in cases if "train_step_time" in c.metrics), default=0)
