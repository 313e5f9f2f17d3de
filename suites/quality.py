"""What CBN buys: training quality of each norm at a small batch, the paper's Fig. 3-5 in miniature.

From one initial network per seed, on the same natural-image batches (suites/minitrain.py), train
BN at m images per step, BN at k*m (the paper's upper bound, the same examples in 1/k of the
steps), GN, and Naive CBN and CBN (negative-variance rules "clamp" and "drop") at m with window k
and a burn-in; several seeds each. Reported per run: held-out accuracy and training loss curves,
final values as mean +- sd over seeds, CBN's rate of negative compensated variances.

Every comparison is paired by seed (the same initial weights and batches) and gets a 95%
t-interval. The control is BN against BN from other seeds (other weights and batches): what a
difference between two identical settings comes to with this many seeds. The paper's claims are
then checked against the measurement with that margin. Nothing is timed; the figures repeat for the
same settings, seeds and versions.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.files import write_atomic
from bench.metrics import Metric, count
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.stats import paired_difference
from bench.suite import Case, Measurement, Table, settings_of
from suites import images, minitrain
from suites.constants import default_profile as default_profile  # the Suite contract's, shared

NAME = "quality"
CONTROL_SEED_OFFSET = 1000  # the A/A control's seeds: seed + offset, sharing nothing with seed
VARIANTS = {  # case variant -> (minitrain norm, negative-variance rule, label)
    "bn": ("bn", "clamp", "BN"),
    "bn_control": ("bn", "clamp", "BN, other seeds (A/A)"),
    "bn_km": ("bn", "clamp", "BN (k x m)"),
    "bn_accum": ("bn", "clamp", "BN (m, k x m per step)"),
    "gn": ("gn", "clamp", "GN"),
    "naive_cbn": ("naive_cbn", "clamp", "Naive CBN"),
    "cbn": ("cbn", "clamp", "CBN"),
    "cbn_drop": ("cbn", "drop", "CBN (drop)"),
}
WINDOWED = ("naive_cbn", "cbn", "cbn_drop")
# The widest difference in held-out accuracy still read as "close" (the paper's Fig. 3 calls CBN
# and its BN bound similar within about one point; a miniature run is noisier): a control margin
# wider than this leaves every "close" claim unresolved, whatever the intervals.
CLOSE_BOUND = 0.05


@dataclass(frozen=True)
class Profile:
    width: int  # channels of the first conv (minitrain.conv_net)
    image_px: int
    batch: int  # m, images per step
    steps: int  # at m images per step
    lr: float  # at m images per step (k x lr at k x m)
    windows: tuple[int, ...]
    burn_ins: tuple[float, ...]  # fractions of the steps; every window is trained with each
    burn_in_sweep: tuple[float, ...]  # further burn-ins for CBN at sweep_window (paper Fig. 5)
    sweep_window: int
    seeds: int
    evaluations: int  # held-out evaluations per run
    held_out: int  # held-out crops
    timeout_s: float


PROFILES = {
    "paper": Profile(32, 64, 4, 3000, 0.05, (2, 4, 8), (0.25, 0.5), (0.0, 0.125, 0.75), 4, 5, 20, 1000, 3600),
    # About 13 minutes on 2 cores (29 cases; a case's worker starts in about 5 s).
    "cpu": Profile(16, 32, 2, 500, 0.05, (2, 4, 8), (0.25, 0.5), (0.0, 0.75), 4, 3, 10, 400, 900),
    "quick": Profile(8, 32, 2, 200, 0.05, (2, 4), (0.25,), (0.5,), 4, 2, 4, 200, 600),
    "smoke": Profile(4, 16, 2, 16, 0.05, (2,), (0.25, 0.5), (0.0,), 2, 2, 2, 50, 300),
}
OPTIONS: dict[str, tuple[str, ...]] = {}
COUNTS: dict[str, str] = {}  # nothing to reuse across runs


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    p = PROFILES[profile]
    chosen = [("bn", 1, None), ("bn_control", 1, None), ("gn", 1, None)]
    chosen += [(v, k, None) for v in ("bn_km", "bn_accum") for k in p.windows]
    chosen += [(v, k, b) for k in p.windows for b in p.burn_ins for v in WINDOWED]
    chosen += [("cbn", p.sweep_window, b) for b in p.burn_in_sweep if b not in p.burn_ins]
    return [Case(NAME, case_name(v, k, b), Settings(p, v, k, b), rounds=0, timeout_s=p.timeout_s) for v, k, b in chosen]


@dataclass(frozen=True)
class Settings:
    """One case: the profile, the variant (a key of VARIANTS), its window k and burn-in (a fraction
    of the steps; None for the variants without a window), with what every case trains with."""

    profile: Profile
    variant: str
    window: int
    burn_in: float | None
    momentum: float = minitrain.MOMENTUM
    weight_decay: float = minitrain.WEIGHT_DECAY
    gn_groups: int = minitrain.GN_GROUPS
    samples: tuple[str, ...] = images.SAMPLES  # the natural images the batches are cropped from


SETTINGS = Settings


def case_name(variant: str, window: int, burn_in: float | None) -> str:
    if variant in ("bn_km", "bn_accum"):
        return f"{variant}-k{window}"
    return variant if burn_in is None else f"{variant}-k{window}-burn{burn_in:g}"


def _settings(case: CaseResult) -> Settings:
    return settings_of(Settings, case)


def recipe(p: Profile, variant: str, window: int, burn_in: float | None) -> minitrain.Recipe:
    norm, rule, _ = VARIANTS[variant]
    if variant == "bn_km":
        return minitrain.Recipe(norm, p.batch * window, p.steps // window, p.lr * window)
    if variant == "bn_accum":  # BN (k x m)'s steps, each k passes of m images: its gradients, BN (m)'s statistics
        return minitrain.Recipe(norm, p.batch * window, p.steps // window, p.lr * window, accumulate=window)
    if variant in WINDOWED:
        return minitrain.Recipe(norm, p.batch, p.steps, p.lr, window, round((burn_in or 0.0) * p.steps), rule)
    return minitrain.Recipe(norm, p.batch, p.steps, p.lr)


def seeds_of(p: Profile, variant: str) -> list[int]:
    offset = CONTROL_SEED_OFFSET if variant == "bn_control" else 0
    return [offset + s for s in range(p.seeds)]


# ---------------------------------------------------------------------- the workload (in the worker)
class QualityWorkload:
    def __init__(self, settings: Settings, device: str) -> None:
        self.p = settings.profile
        self.variant = settings.variant
        self.recipe = recipe(self.p, self.variant, settings.window, settings.burn_in)
        self.device = torch.device(device)

    def measure(self) -> Measurement:
        held_out = minitrain.held_out_set(self.p.held_out, self.p.image_px)
        metrics: dict[str, Metric] = {}
        for index, seed in enumerate(seeds_of(self.p, self.variant)):
            torch.manual_seed(seed)
            model = minitrain.conv_net(self.p.width, len(images.SAMPLES))  # BN layers; train() swaps the norm
            run = minitrain.train(model, self.recipe, m=self.p.batch, image_px=self.p.image_px, seed=seed,
                                  evaluations=self.p.evaluations, held_out=held_out, device=self.device)
            metrics.update(_run_metrics(index, run))
        metrics.update(_summary_metrics(metrics, self.p.seeds))
        r = self.recipe
        notes = [f"{r.steps} steps of {r.batch} images at lr {r.lr:g}"
                 + (f", window {r.window}, burn-in {r.burn_in} steps, rule {r.negative_variance}" if r.window > 1 else "")]
        return Measurement(metrics, notes)

    def warmup(self) -> None:
        pass  # nothing is timed

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        return {}


def _run_metrics(index: int, run: minitrain.History) -> dict[str, Metric]:
    """One seed's figures (all unit "1"), under "seed <index>." (the control's index, not its seed,
    so that its runs pair with the others by position)."""
    prefix = f"seed {index}."
    out = {prefix + "accuracy": count(run.accuracy[-1], "1"), prefix + "final loss": count(run.final_loss, "1"),
           prefix + "diverged": count(float(run.diverged), "1"),
           prefix + "negative variances": count(run.negative, "1"),
           prefix + "compensated entries": count(run.compensated, "1")}
    for examples, loss, acc in zip(run.examples, run.train_loss, run.accuracy):
        out[f"{prefix}curve {examples}.train loss"] = count(loss, "1")
        out[f"{prefix}curve {examples}.accuracy"] = count(acc, "1")
    return out


def _summary_metrics(metrics: dict[str, Metric], seeds: int) -> dict[str, Metric]:
    out = {}
    for name in ("accuracy", "final loss"):
        values = [metrics[f"seed {i}.{name}"].value for i in range(seeds)]
        out[name] = count(statistics.fmean(values), "1")
        out[name + " sd"] = count(statistics.stdev(values) if len(values) > 1 else 0.0, "1")
    out["diverged"] = count(sum(metrics[f"seed {i}.diverged"].value for i in range(seeds)), "1")
    negative = sum(metrics[f"seed {i}.negative variances"].value for i in range(seeds))
    compensated = sum(metrics[f"seed {i}.compensated entries"].value for i in range(seeds))
    out["negative variance rate"] = count(negative / compensated if compensated else 0.0, "1")
    return out


def build(case: Case, device: str) -> QualityWorkload:
    return QualityWorkload(case.settings, device)


# ---------------------------------------------------------------------- comparisons (in the runner)
@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a comparison of two runs' held-out accuracy: "above" (a better
    than b) or "close" (a within the control's margin of b)."""

    text: str
    a: str  # case names
    b: str
    relation: str  # "above" or "close"

    @property
    def id(self) -> FigureId:
        return FigureId(NAME, self.a, f"accuracy_claim_{self.relation}", f"minus:{self.b}")


def claims(p: Profile) -> list[Claim]:
    """The paper's claims (Fig. 3-5) for the settings of profile p."""
    out = []
    for k in p.windows:
        for b in p.burn_ins:
            cbn_case = case_name("cbn", k, b)
            out.append(Claim(f"CBN k={k} (burn-in {b:g}) close to BN at k x m", cbn_case, f"bn_km-k{k}", "close"))
            out.append(Claim(f"CBN k={k} (burn-in {b:g}) above BN at m", cbn_case, "bn", "above"))
    for k in p.windows:  # the premise: what BN's own statistics over k x m images are worth, gradients equal
        out.append(Claim(f"premise, k={k}: BN at k x m above BN at m with the same k x m gradient batch",
                         f"bn_km-k{k}", f"bn_accum-k{k}", "above"))
    widest, first = max(p.windows), p.burn_ins[0]
    out.append(Claim(f"Naive CBN fails at k={widest}: CBN above it (burn-in {first:g})",
                     case_name("cbn", widest, first), case_name("naive_cbn", widest, first), "above"))
    sweep = sorted({*p.burn_in_sweep, *p.burn_ins} - {first})
    for b in sweep:
        out.append(Claim(f"CBN k={p.sweep_window} stable over burn-ins: {b:g} close to {first:g}",
                         case_name("cbn", p.sweep_window, b), case_name("cbn", p.sweep_window, first), "close"))
    return out


def seed_values(case: CaseResult, name: str = "accuracy") -> list[float]:
    prefix_count = sum(1 for m in case.metrics if m.startswith("seed ") and m.endswith("." + name)
                       and m.count(".") == 1)
    return [case.metrics[f"seed {i}.{name}"].value for i in range(prefix_count)]


def derive(case_results: list[CaseResult]) -> list[Derived]:
    """Per case, its accuracy difference to BN at m (paired by seed); the A/A control's; and every
    claim's difference, with its verdict in the note."""
    ok = {c.case: c for c in case_results if c.suite == NAME and c.status == "ok"}
    if "bn" not in ok:
        return []
    out = []
    for name, case in ok.items():
        if name != "bn":
            out.append(_difference(to_bn_id(name), f"{name} - bn accuracy", case, ok["bn"]))
    control = next((d for d in out if d.id == to_bn_id("bn_control")), None)
    margin = _margin(control)
    for claim in claims(_settings(ok["bn"]).profile):
        if claim.a in ok and claim.b in ok:
            d = _difference(claim.id, f"claim: {claim.text}", ok[claim.a], ok[claim.b])
            out.append(dataclasses.replace(d, note=verdict(d, claim.relation, margin)))
    return out


def to_bn_id(case: str) -> FigureId:
    """case's held-out accuracy less BN's (at m), paired by seed."""
    return FigureId(NAME, case, "accuracy", "minus:bn")


def _difference(figure: FigureId, label: str, a: CaseResult, b: CaseResult) -> Derived:
    mean, low, high = paired_difference(seed_values(a), seed_values(b))
    return Derived(figure, label, mean, low, high)


def _margin(control: Derived | None) -> float:
    """What a difference must exceed: the A/A control's farthest interval end from 0 (its mean's
    magnitude with one seed, nan without the control)."""
    if control is None:
        return math.nan
    ends = [v for v in (control.ci_low, control.ci_high) if v is not None and math.isfinite(v)]
    return max(abs(v) for v in ends) if ends else abs(control.value)


def verdict(d: Derived, relation: str, margin: float) -> str:
    """"holds", "does not hold" or "not resolved" for a paired difference d = a - b, its 95%
    interval and the A/A control's margin:

    * above: holds if the interval is above 0 and the mean above the margin; does not hold if the
      interval is below 0 (b better than a); otherwise not resolved.
    * close: holds if the interval lies within +-margin and the margin within CLOSE_BOUND; does
      not hold if the interval excludes 0 and the mean is farther from 0 than CLOSE_BOUND;
      otherwise not resolved (too few seeds to tell)."""
    if not math.isfinite(margin) or d.ci_low is None or not math.isfinite(d.ci_low):
        return "not resolved (no interval: needs two seeds and the control)"
    if relation == "above":
        if d.ci_low > 0 and d.value > margin:
            return "holds"
        return "does not hold" if d.ci_high < 0 else "not resolved"
    excludes_zero = d.ci_low > 0 or d.ci_high < 0
    if excludes_zero and abs(d.value) > CLOSE_BOUND:
        return "does not hold"
    if margin > CLOSE_BOUND:
        return f"not resolved (control margin {margin:.3f} > {CLOSE_BOUND}: more seeds)"
    return "holds" if -margin <= d.ci_low and d.ci_high <= margin else "not resolved"


# ---------------------------------------------------------------------- reporting (in the runner)
def _ok(run: RunResult) -> dict[str, CaseResult]:
    return {c.case: c for c in run.cases_of(NAME) if c.status == "ok"}


def _label(case: CaseResult) -> str:
    return VARIANTS[_settings(case).variant][2]


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    p = _settings(cases_here[0]).profile
    derived = run.derived_of(NAME)
    where = (f"{p.width}-wide 6-conv net, {len(images.SAMPLES)} photographs as classes, {p.image_px} px, "
             f"m = {p.batch} images per step, {p.steps} steps, {p.seeds} seeds, on {run.environment.device_name}")
    return [_results_table(run, where, derived), _claims_table(run, derived)]


def _results_table(run: RunResult, where: str, derived: dict[FigureId, Derived]) -> Table:
    rows = []
    for case in run.cases_of(NAME):
        s = _settings(case)
        k, burn = s.window, s.burn_in
        head = [_label(case), str(k) if k > 1 else "", "" if burn is None else f"{burn:g}"]
        if case.status != "ok":
            rows.append(head + [case.status, (case.error or "")[:60], "", "", ""])
            continue
        m = case.metrics
        diff = derived.get(to_bn_id(case.case))
        rate = m["negative variance rate"].value
        rows.append(head + [f"{m['accuracy'].value:.3f} +- {m['accuracy sd'].value:.3f}",
                            f"{m['final loss'].value:.3f} +- {m['final loss sd'].value:.3f}",
                            "" if diff is None else _interval(diff),
                            f"{rate:.2%}" if s.variant in ("cbn", "cbn_drop") else "",
                            f"{int(m['diverged'].value)}/{len(seed_values(case))}"])
    columns = ["norm", "k", "burn-in", "held-out acc", "train loss", "acc - BN (m)", "neg. var.", "diverged"]
    caption = [
        "held-out acc: top-1 on unseen crops of the same photographs (another seed), eval mode, after the last step; "
        "train loss: mean over the last tenth of the steps; mean +- sd over seeds",
        "acc - BN (m): paired by seed (same initial weights, same images), mean and 95% t-interval; BN (k x m) sees "
        "the same images k per step over 1/k of the steps at k x the learning rate; BN (m, k x m per step) takes "
        "the same steps with BN (k x m)'s gradients but normalizes each m images alone (gradient accumulation over "
        "k passes, as unsynchronized BN on k devices); burn-in: fraction of the steps",
        "neg. var.: share of CBN's compensated window entries (past step x channel) whose variance came out negative "
        "(clamped to 0, or dropped from the window)",
    ]
    return Table(f"Training quality, profile {run.profile}: {where}", columns, rows, caption)


def _claims_table(run: RunResult, derived: dict[FigureId, Derived]) -> Table:
    control = derived.get(to_bn_id("bn_control"))
    margin = _margin(control)
    rows = [[d.label.removeprefix("claim: "), _interval(d), d.note] for figure, d in derived.items()
            if figure.quantity.startswith("accuracy_claim_")]
    caption = [f"difference of held-out accuracy, paired by seed, mean and 95% t-interval; margin {margin:.3f}: "
               "the A/A control's (BN against BN from other seeds) farthest interval end from 0"
               + ("" if control is None else f", control {_interval(control)}"),
               "above: holds if the interval is above 0 and the mean above the margin, does not hold if the interval "
               f"is below 0; close: holds if the interval lies within +-margin (and the margin within {CLOSE_BOUND}), "
               f"does not hold if the interval excludes 0 with the mean beyond {CLOSE_BOUND}; otherwise not resolved "
               "with these seeds"]
    return Table(f"The paper's claims against this run, profile {run.profile}", ["claim", "difference", "verdict"],
                 rows, caption)


def _interval(d: Derived) -> str:
    if d.ci_low is None or not math.isfinite(d.ci_low):
        return f"{d.value:+.3f}"
    return f"{d.value:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"


def figures(run: RunResult, stem: Path) -> list[Path]:
    ok = _ok(run)
    if "bn" not in ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = _settings(ok["bn"]).profile
    first = p.burn_ins[0]
    k = p.sweep_window
    shown = ["bn", f"bn_km-k{k}", f"bn_accum-k{k}", "gn", *(case_name(v, k, first) for v in WINDOWED)]
    curves, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in shown:
        if name in ok:
            _plot_curve(axes, ok[name], _label(ok[name]))
    for ax, ylabel in zip(axes, ("training loss", "held-out accuracy")):
        ax.set_xlabel("training images seen")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    curves.suptitle(f"Training curves, k={k}, burn-in {first:g}, mean +- sd over {p.seeds} seeds ({run.profile})")
    curves.tight_layout()
    paths = [_save(curves, stem.with_name(stem.name + "_quality_curves.png"))]

    by_window, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in ("bn_km", "bn_accum", *WINDOWED):
        names = [(kk, case_name(variant, kk, first)) for kk in p.windows]
        points = [(kk, ok[n]) for kk, n in names if n in ok]
        ax.errorbar([kk for kk, _ in points], [c.metrics["accuracy"].value for _, c in points],
                    yerr=[c.metrics["accuracy sd"].value for _, c in points], marker="o", capsize=3,
                    label=VARIANTS[variant][2])
    bn = ok["bn"].metrics
    ax.axhline(bn["accuracy"].value, color="grey", linestyle="--", label="BN (m)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window k (BN: k x m images per step)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    by_window.suptitle(f"Final accuracy against k, burn-in {first:g} ({run.profile})")
    by_window.tight_layout()
    paths.append(_save(by_window, stem.with_name(stem.name + "_quality_windows.png")))
    plt.close("all")
    return paths


def _plot_curve(axes, case: CaseResult, label: str) -> None:
    for ax, quantity in zip(axes, ("train loss", "accuracy")):
        by_examples: dict[int, list[float]] = {}
        for name, metric in case.metrics.items():
            if name.startswith("seed ") and ".curve " in name and name.endswith("." + quantity):
                examples = int(name.split(".curve ")[1].split(".")[0])
                by_examples.setdefault(examples, []).append(metric.value)
        xs = sorted(by_examples)
        means = [statistics.fmean(by_examples[x]) for x in xs]
        sds = [statistics.stdev(by_examples[x]) if len(by_examples[x]) > 1 else 0.0 for x in xs]
        line, = ax.plot(xs, means, label=label)
        ax.fill_between(xs, [a - s for a, s in zip(means, sds)], [a + s for a, s in zip(means, sds)],
                        color=line.get_color(), alpha=0.15)


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path
