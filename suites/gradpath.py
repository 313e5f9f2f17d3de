"""CBN's statistic gradients by the efficient (Appendix B) and the naive (dense Jacobian) path.

One 3x3 or 1x1 conv with C_in = C_out = C on a detection-sized feature map. Timed: what one training
step adds for one layer — the statistic gradients of this iteration and the compensation of a past
iteration's statistics to new weights. The naive case also computes the efficient result and
records the largest difference, so every run checks that the two paths agree.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import memory, report, sampling
from bench.files import write_atomic
from bench.metrics import Metric, count, peak
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.stats import loglog_slope, ratio_of_medians
from bench.suite import Case, Measurement, Table, settings_of
from bench.timing import synchronize, time_call
from cbn.statgrad import GRAD_PATHS, ConvGeometry, linear_at
from suites.constants import AGREEMENT_TOLERANCE, CPU_NAIVE_BUDGET_BYTES, CUDA_NAIVE_BUDGET_SHARE
from suites.constants import default_profile as default_profile  # the Suite contract's, shared

NAME = "gradpath"
PATHS = ("efficient", "naive")
KERNELS = (3, 1)
SLOPE_POINTS = 3
BLOCK_S = 0.2


@dataclass(frozen=True)
class Profile:
    channels: tuple[int, ...]
    batch: int
    height_px: int
    width_px: int
    rounds: int
    naive_budget_bytes: int | None  # None: CUDA_NAIVE_BUDGET_SHARE of the GPU's memory


PROFILES = {
    # stride-8 level of an 800x1216 image, 2 images per device; 16 workers, about 2 minutes on one H100
    "paper": Profile((64, 128, 256, 512), 2, 100, 152, rounds=5, naive_budget_bytes=None),
    "cpu": Profile((16, 32, 64, 128, 256), 1, 32, 48, rounds=3, naive_budget_bytes=CPU_NAIVE_BUDGET_BYTES),
    "quick": Profile((64, 128, 256), 1, 32, 48, rounds=3, naive_budget_bytes=CPU_NAIVE_BUDGET_BYTES),  # the CI gate's
    "smoke": Profile((8, 16), 1, 8, 12, rounds=2, naive_budget_bytes=1 << 30),
}
OPTIONS: dict[str, tuple[str, ...]] = {}
COUNTS: dict[str, str] = {}  # nothing to reuse: its counts take no time


@dataclass(frozen=True)
class Settings:
    """One case: the profile, the path (a key of cbn.statgrad.GRAD_PATHS), the kernel and C."""

    profile: Profile
    path: str
    kernel: int
    channels: int
    block_s: float = BLOCK_S  # a sample times a block of calls of at least this long
    agreement_tolerance: float = AGREEMENT_TOLERANCE


SETTINGS = Settings


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    p = PROFILES[profile]
    return [
        Case(NAME, case_name(path, k, c), Settings(p, path, k, c), group=f"{k}x{k}-C{c}", rounds=p.rounds, timeout_s=600)
        for k in KERNELS for c in p.channels for path in PATHS
    ]


def case_name(path: str, kernel: int, channels: int) -> str:
    return f"{path}-{kernel}x{kernel}-C{channels}"


def naive_bytes_estimate(c: int, kernel: int, batch: int, height: int, width: int) -> int:
    """Dense Jacobians (2 x C x |W| floats) plus jacrev's batched cotangents (2C copies of x, twice)."""
    weight = c * c * kernel * kernel
    x = batch * c * height * width
    return 4 * (2 * c * weight + 2 * 2 * c * x)


class StatGradWorkload:
    def __init__(self, settings: Settings, device: str) -> None:
        p = settings.profile
        self.device = torch.device(device)
        self.settings, self.profile = settings, p
        c, k = settings.channels, settings.kernel
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, k, padding=k // 2, bias=False).to(self.device)
        self.geometry = ConvGeometry.of(conv)
        self.path = GRAD_PATHS[settings.path]
        with torch.no_grad():
            self.y = torch.randn(p.batch, c, p.height_px, p.width_px, device=self.device)
            self.weight = conv.weight.detach().clone()
            self.x = conv(self.y)
            self.mean = self.x.mean((0, 2, 3))
            self.mean_sq = self.x.square().mean((0, 2, 3))
            self.new_weight = self.weight + 1e-3 * torch.randn_like(self.weight)

    def work(self, path=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's statistic gradients, then a compensation to new weights: (d_mean, d_sq), the
        linear forms at the new weights less those at the recording ones, (mu, 2 nu) as the layer has it."""
        path = path or self.path
        with torch.no_grad():
            fields = path.compute(self.y, self.x, self.weight, None, self.geometry)
            now_mean, now_sq = linear_at(path, fields, self.new_weight, None, self.mean)
            self.stored_bytes = sum(t.numel() * t.element_size() for t in fields.values())
        return now_mean - self.mean, now_sq - 2 * self.mean_sq

    def measure(self) -> Measurement:
        p, c, k = self.profile, self.settings.channels, self.settings.kernel
        if self.settings.path == "naive":
            total = None if p.naive_budget_bytes else torch.cuda.get_device_properties(self.device).total_memory
            budget = p.naive_budget_bytes or int(CUDA_NAIVE_BUDGET_SHARE * total)
            need = naive_bytes_estimate(c, k, p.batch, p.height_px, p.width_px)
            if need > budget:
                reason = (f"skipped: the dense path needs about {report.fmt_bytes(need)}, over the "
                          f"{report.fmt_bytes(budget)} budget")
                return Measurement({"estimated_bytes": count(need, "byte")}, [reason], status="skipped")
        metrics, result = self._peak_memory()
        metrics["stored_bytes_per_step"] = count(self.stored_bytes + 2 * c * 4, "byte")  # + mean and var
        error = None
        if self.settings.path == "naive":
            reference = self.work(GRAD_PATHS["efficient"])
            diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(result, reference))
            metrics["max_relative_difference_to_efficient"] = count(diff, "1")
            if diff > AGREEMENT_TOLERANCE:
                error = f"naive and efficient paths disagree: max relative difference {diff:.2e}"
        return Measurement(metrics, error=error)

    def _peak_memory(self) -> tuple[dict[str, Metric], tuple]:
        if self.device.type == "cuda":
            synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = self.work()
            synchronize(self.device)
            return {"peak_extra_bytes": peak(torch.cuda.max_memory_allocated(self.device) - base)}, result
        base = memory.peak_rss_bytes()
        result = self.work()
        # The peak RSS is a high-water mark: its growth is this call's extra peak, when it exceeds
        # the footprint before; small calls show 0 (they fit in memory the process already had).
        return {"peak_rss_growth_bytes": peak(memory.peak_rss_bytes() - base)}, result

    def warmup(self) -> None:
        # Calls of a millisecond are timed in blocks of at least BLOCK_S, so that one sample is
        # not one scheduler hiccup: the calls per block are fixed here, from the warm-up call.
        once = time_call(self.work, self.device)
        self.calls_per_sample = max(1, math.ceil(BLOCK_S / max(once, 1e-6)))

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        return sampling.keep_last(self._block, kept, discarded)

    def _block(self) -> dict[str, float]:
        block = time_call(lambda: [self.work() for _ in range(self.calls_per_sample)], self.device)
        return {"stat_grad_time": block / self.calls_per_sample}


def build(case: Case, device: str) -> StatGradWorkload:
    return StatGradWorkload(case.settings, device)


# ---------------------------------------------------------------------- reporting
def _key(case: CaseResult) -> tuple[str, int, int]:
    s = settings_of(Settings, case)
    return s.path, s.kernel, s.channels


def _ok(case_results: list[CaseResult]) -> dict[tuple[str, int, int], CaseResult]:
    return {_key(c): c for c in case_results if c.status == "ok"}


def speedup_id(kernel: int, channels: int) -> FigureId:
    """The naive path's time over the efficient one's."""
    return FigureId(NAME, case_name("naive", kernel, channels), "stat_grad_time", "ratio_to:efficient")


def stored_ratio_id(kernel: int, channels: int) -> FigureId:
    return FigureId(NAME, case_name("naive", kernel, channels), "stored_bytes_per_step", "ratio_to:efficient")


def slope_id(path: str, kernel: int) -> FigureId:
    return FigureId(NAME, f"{path}-{kernel}x{kernel}", "stat_grad_time", "loglog_slope_in:C")


def _peak(case: CaseResult) -> float:
    m = case.metrics
    return (m["peak_extra_bytes"] if "peak_extra_bytes" in m else m["peak_rss_growth_bytes"]).value


def derive(case_results: list[CaseResult]) -> list[Derived]:
    ok = _ok(case_results)
    out = []
    for (path, k, c), case in sorted(ok.items()):
        if path != "naive" or ("efficient", k, c) not in ok:
            continue
        eff = ok[("efficient", k, c)]
        r = ratio_of_medians(case.metrics["stat_grad_time"].samples, eff.metrics["stat_grad_time"].samples)
        out.append(Derived(speedup_id(k, c), f"speedup {k}x{k} C={c}", r.median, r.ci_low, r.ci_high, kind="timing"))
        out.append(Derived(stored_ratio_id(k, c), f"stored memory ratio {k}x{k} C={c}",
                           case.metrics["stored_bytes_per_step"].value / eff.metrics["stored_bytes_per_step"].value))
    for path in PATHS:
        for k in KERNELS:
            points = sorted((c, case.metrics["stat_grad_time"].value) for (p, kk, c), case in ok.items() if p == path and kk == k)
            # The three largest C: below them fixed per-call costs flatten the curve, hiding the power law.
            points = points[-SLOPE_POINTS:]
            if len(points) >= 2:
                slope = loglog_slope([c for c, _ in points], [t for _, t in points])
                out.append(Derived(slope_id(path, k), f"time slope in C, {path} {k}x{k}", slope,
                                   note=f"fitted over C={points[0][0]}..{points[-1][0]}", kind="timing"))
    return out


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    derived = run.derived_of(NAME)
    p = settings_of(Settings, cases_here[0]).profile
    rows = []
    for case in cases_here:
        path, k, c = _key(case)
        if case.status != "ok":
            why = (case.notes or [case.error or ""])[0]
            rows.append([f"{k}x{k}", str(c), path, case.status, why[:70], "", ""])
            continue
        speed = derived.get(speedup_id(k, c)) if path == "naive" else None
        rows.append([f"{k}x{k}", str(c), path, f"{1e3 * case.metrics['stat_grad_time'].value:.3g}",
                     report.fmt_bytes(case.metrics["stored_bytes_per_step"].value), report.fmt_bytes(_peak(case)),
                     "" if speed is None else report.fmt_ratio(speed.value, speed.ci_low, speed.ci_high)])
    slopes = [f"{path} {k}x{k}: {derived[slope_id(path, k)].value:.2f} ({derived[slope_id(path, k)].note})"
              for path in PATHS for k in KERNELS if slope_id(path, k) in derived]
    caption = [
        f"one conv + CBN statistic work per step on {p.batch}xCx{p.height_px}x{p.width_px}, C_in = C_out = C; "
        "time = median of interleaved rounds, each a block of calls of at least 0.2 s; stored = history kept per past step; peak = "
        + ("extra CUDA memory allocated during the work" if run.device == "cuda" else "growth of the process peak RSS"),
        "log-log slopes of time in C: " + ("; ".join(slopes) if slopes else "-"),
    ]
    title = f"Statistic-gradient paths, profile {run.profile}, on {run.environment.device_name}"
    return [Table(title, ["kernel", "C", "path", "time ms", "stored/step", "peak", "naive/efficient time"], rows, caption)]


def figures(run: RunResult, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(run.cases_of(NAME))
    if not ok:
        return []
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in PATHS:
        for k in KERNELS:
            points = sorted((c, case) for (p, kk, c), case in ok.items() if p == path and kk == k)
            if not points:
                continue
            cs = [c for c, _ in points]
            style = dict(marker="o" if path == "efficient" else "s", linestyle="-" if k == 3 else "--", label=f"{path} {k}x{k}")
            ax_time.plot(cs, [1e3 * case.metrics["stat_grad_time"].value for _, case in points], **style)
            ax_mem.plot(cs, [case.metrics["stored_bytes_per_step"].value for _, case in points], **style)
    for ax, label in ((ax_time, "time per step (ms)"), (ax_mem, "stored per past step (bytes)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("channels C (C_in = C_out)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"CBN statistic gradients: efficient vs naive ({run.profile}, {run.environment.device_name})")
    fig.tight_layout()
    path = stem.with_name(stem.name + "_gradpath.png")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return [path]
