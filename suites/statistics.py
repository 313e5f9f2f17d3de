"""CBN's premise, measured: how well each norm's statistics estimate those of the examples in its
window under the current weights (paper Fig. 3-4), how often the compensation fails (a negative
compensated variance), and whether truncating the Taylor term to the layer's own conv is justified
(Fig. 6: about 0.12 for mu and 0.39 for nu on ResNet).

Each case (a regime, a window k and a learning rate) trains, for each of several seeds, four
copies of one backbone from the same weights, side by side on the same natural-image batches
(suites/images.py) with SGD: BN on m images per step, BN on the k*m images of the window (the
paper's upper bound), Naive CBN (k) and CBN (k) on m. Every ``measure_every`` steps, for BN, Naive
CBN and CBN, each norm layer's statistics as used in that step's forward are compared with the
statistics of the window's k*m examples recomputed under the weights of that step, every layer
normalizing as in that step, so that each layer's error is its own (suites/estimation.py); on the
CBN copy, the truncation ratios (first seed) and the share of compensated window entries whose
variance came out negative (``cbn.negative_variance_counts``).

Two regimes:

* ``scratch``: the copies start from random weights; the window is on from the first step. Early
  steps move the weights fast, so the first-order compensation of nu (a convex quadratic in the
  conv's weights) underestimates it: the failure mode, kept on record.
* ``settled``: the copies start where a BN network trained for ``settle_steps`` steps on the same
  batches (optimizer state included) left off: for the CBN copies exactly a burn-in of that many
  steps, the paper's remedy (25 of 100 ImageNet epochs). settle_steps is three times the measured
  steps, so the burn-in is three quarters of the run: the measured steps come after the fastest
  weight changes (the first tens of steps from random weights), at the same learning rate.

Nothing is timed; the figures repeat for the same settings, seeds and versions. A verdict says
whether CBN's error is below the others' beyond the spread over seeds (paired by seed, 95%
t-interval).
"""

from __future__ import annotations

import copy
import io
import math
import statistics as stats
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import cbn
from bench.files import write_atomic
from bench.metrics import Metric, count
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.stats import paired_difference
from bench.suite import Case, Measurement, Table, settings_of
from suites import estimation, images
from suites.constants import default_profile as default_profile  # the Suite contract's, shared

NAME = "statistics"
VARIANTS = ("bn", "bn_km", "naive_cbn", "cbn")  # trained side by side in every case
ESTIMATORS = ("bn", "naive_cbn", "cbn")  # whose statistics are compared with the window's
LABELS = {"bn": "BN", "bn_km": "BN (k x batch)", "naive_cbn": "Naive CBN", "cbn": "CBN"}
PAPER_TRUNCATION = {"mu r=1": 0.12, "nu r=1": 0.39}  # Fig. 6, ResNet on ImageNet
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
REGIMES = ("scratch", "settled")


@dataclass(frozen=True)
class Profile:
    model: str  # key of MODELS
    image_px: int
    batch: int  # images per step, m
    steps: int  # measured steps, after settle_steps in the settled regime
    windows: tuple[int, ...]
    learning_rates: tuple[float, ...]
    measure_every: int  # steps between measurements; the first at step measure_every (window full)
    truncation_points: int  # the first this many measurements also give truncation ratios
    probes: int  # random directions per Frobenius-norm estimate (estimation.truncation_ratios)
    timeout_s: float
    regimes: tuple[str, ...] = ("scratch",)  # files before the regimes measured from scratch only
    settle_steps: int = 0  # BN steps before the measured ones, settled regime
    seeds: int = 1


PROFILES = {
    "paper": Profile("resnet50_fpn", 224, 4, 300, (2, 4, 8), (0.01, 0.05), 50, 3, 16, 3600, REGIMES, 900, 3),
    # About 20 minutes on 2 cores (a seed's run takes about a minute, the settling half a minute).
    "cpu": Profile("resnet18", 32, 4, 100, (2, 4, 8), (0.01,), 20, 2, 4, 1800, REGIMES, 300, 3),
    "quick": Profile("resnet18", 32, 2, 40, (2, 4), (0.02,), 10, 1, 4, 600, REGIMES, 120, 2),
    "smoke": Profile("resnet18", 32, 2, 12, (2,), (0.02,), 6, 1, 2, 300, REGIMES, 6, 2),
}
OPTIONS: dict[str, tuple[str, ...]] = {}
COUNTS: dict[str, str] = {}  # nothing to reuse across runs


@dataclass(frozen=True)
class Settings:
    """One case: the profile, the regime, CBN's window k and the learning rate, with the optimizer
    and the images every case trains with."""

    profile: Profile
    regime: str  # one of REGIMES
    window: int
    lr: float
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    samples: tuple[str, ...] = images.SAMPLES  # the natural images the batches are cropped from


SETTINGS = Settings


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    p = PROFILES[profile]
    return [Case(NAME, f"{regime}-k{k}-lr{lr:g}", Settings(p, regime, k, lr), rounds=0, timeout_s=p.timeout_s)
            for regime in p.regimes for lr in p.learning_rates for k in p.windows]


def _settings(case: CaseResult) -> Settings:
    return settings_of(Settings, case)


def _head(case: CaseResult) -> list[str]:
    """A case's first table cells: regime, learning rate, window."""
    s = _settings(case)
    return [s.regime, f"{s.lr:g}", str(s.window)]


def _k_and_lr(case: CaseResult) -> str:
    s = _settings(case)
    return f"k={s.window}, lr={s.lr:g}"


# ---------------------------------------------------------------------- models
class FPNClassifier(nn.Module):
    """torchvision's ResNet-50-FPN backbone (BatchNorm2d in the ResNet, none in the FPN) with a
    linear classifier on the average of its globally pooled levels."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        self.backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=nn.BatchNorm2d,
                                            trainable_layers=5)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.backbone(x).values()
        return self.fc(torch.stack([level.mean((2, 3)) for level in levels]).mean(0))


MODELS = {
    "resnet18": lambda classes: torchvision.models.resnet18(weights=None, num_classes=classes),
    "resnet50_fpn": FPNClassifier,
}


def variants(bn: nn.Module, window: int) -> dict[str, nn.Module]:
    """The four copies of bn (same weights): the CBN ones converted."""
    return {
        "bn": bn,
        "bn_km": copy.deepcopy(bn),
        "naive_cbn": cbn.convert(copy.deepcopy(bn), window=window, compensate=False),
        "cbn": cbn.convert(copy.deepcopy(bn), window=window),
    }


# ---------------------------------------------------------------------- the workload (in the worker)
class StatisticsWorkload:
    def __init__(self, settings: Settings, device: str) -> None:
        self.p = settings.profile
        self.k, self.lr, self.regime = settings.window, settings.lr, settings.regime
        self.device = torch.device(device)

    def measure(self) -> Measurement:
        per_seed: list[dict[str, Metric]] = []
        for seed in range(self.p.seeds):
            run = SeedRun(self.p, self.k, self.lr, self.regime, seed, self.device)
            per_seed.append(run.measure(truncation=seed == 0))
        metrics = {f"seed {i}.{name}": m for i, found in enumerate(per_seed) for name, m in found.items()}
        metrics.update(_over_seeds(per_seed))
        start = self.p.settle_steps if self.regime == "settled" else 0
        notes = [f"{self.p.model}, {self.p.batch} x {self.p.image_px} px per step, {self.p.steps} SGD steps"
                 + (f" after {start} BN steps" if start else " from random weights")
                 + f", {self.p.seeds} seeds, errors every {self.p.measure_every} steps"]
        return Measurement(metrics, notes)

    def warmup(self) -> None:
        pass  # nothing is timed

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        return {}


class SeedRun:
    """The four copies of one seed's network, trained side by side on that seed's batches."""

    def __init__(self, p: Profile, k: int, lr: float, regime: str, seed: int, device: torch.device) -> None:
        self.p, self.k, self.seed, self.device = p, k, seed, device
        torch.manual_seed(seed)
        bn = MODELS[p.model](len(images.SAMPLES)).to(device)
        optimizer = _sgd(bn, lr)
        self.start = p.settle_steps if regime == "settled" else 0
        for step in range(self.start):  # the settled regime: a BN burn-in on the same batches
            x, y = self._batch(step)
            nn.functional.cross_entropy(bn(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.models = variants(bn, k)
        self.optimizers = {name: _sgd(m, lr) for name, m in self.models.items()}
        for opt in self.optimizers.values():  # momentum carried over: the CBN copies' burn-in, exactly
            opt.load_state_dict(optimizer.state_dict())
        self.twin = copy.deepcopy(bn)  # the BatchNorm twin the truth passes run in
        self.convs = estimation.conv_of_norm(self.models["cbn"])
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def measure(self, truncation: bool) -> dict[str, Metric]:
        errors: dict[str, dict[int, dict[str, tuple[float, float]]]] = {v: {} for v in ESTIMATORS}
        ratios: list[dict[str, float]] = []
        losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
        negative_rates: dict[int, float] = {}
        previous = (0, 0)
        for step in range(self.p.steps):
            self.batches = (self.batches + [self._batch(self.start + step)])[-self.k:]  # the window's batches
            measured = step >= self.k - 1 and step > 0 and step % self.p.measure_every == 0  # a full window
            for name in VARIANTS:
                used, loss = self._train_step(name, record=measured and name in ESTIMATORS)
                losses[name].append(loss)
                if used is not None:
                    truth = estimation.window_truth(self.twin, self.models[name], self._window_images(), used)
                    errors[name][step] = {layer: estimation.relative_errors(used[layer], truth[layer]) for layer in used}
                self.optimizers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
            if measured:
                now = _negative_counts(self.models["cbn"])
                negative_rates[step] = _rate(now[0] - previous[0], now[1] - previous[1])
                previous = now
            if measured and truncation and len(ratios) < self.p.truncation_points:
                ratios.append(self._truncation(step))
        out = _metrics(errors, ratios, losses)
        out.update(_negative_metrics(self.models["cbn"], negative_rates))
        return out

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images.batch(step, self.p.batch, self.p.image_px, seed=self.seed)
        return x.to(self.device), y.to(self.device)

    def _window_images(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.batches])

    def _train_step(self, name: str, record: bool) -> tuple[dict | None, float]:
        model = self.models[name]
        model.train()
        x, y = (torch.cat([b[i] for b in self.batches]) for i in (0, 1)) if name == "bn_km" else self.batches[-1]
        if not record:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return None, loss.item()
        with estimation.UsedStatistics(model) as used:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return used.stats, loss.item()

    def _truncation(self, step: int) -> dict[str, float]:
        self.twin.load_state_dict(self.models["cbn"].state_dict(), strict=False)
        gen = torch.Generator().manual_seed(step)
        ratios = estimation.truncation_ratios(self.twin, self.convs, self.batches[-1][0], probes=self.p.probes, generator=gen)
        self.twin.zero_grad(set_to_none=True)
        return ratios


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _negative_counts(model: nn.Module) -> tuple[int, int]:
    counts = cbn.negative_variance_counts(model).values()
    return sum(n for n, _ in counts), sum(c for _, c in counts)


def _rate(negative: int, compensated: int) -> float:
    return negative / compensated if compensated else 0.0


def _negative_metrics(model: nn.Module, by_step: dict[int, float]) -> dict[str, Metric]:
    """The CBN copy's share of compensated window entries whose variance came out negative: over
    the run, per layer, and per measurement interval (the steps since the previous measurement)."""
    counts = cbn.negative_variance_counts(model)
    out = {"cbn.negative variance rate": count(_rate(*_negative_counts(model)), "1")}
    out.update({f"cbn.negative variance rate.layer {layer}": count(_rate(n, c), "1") for layer, (n, c) in counts.items()})
    out.update({f"cbn.negative variance rate.step {step}": count(rate, "1") for step, rate in by_step.items()})
    return out


def _metrics(errors: dict, truncation: list[dict[str, float]], losses: dict[str, list[float]]) -> dict[str, Metric]:
    """Flat, named figures (all unit "1"): per estimator the errors averaged over layers and steps,
    per step (over layers) and per layer (over steps); truncation ratios; final training losses."""
    out: dict[str, Metric] = {}
    for name, by_step in errors.items():
        per_layer: dict[str, list[tuple[float, float]]] = {}
        for step, layers in by_step.items():
            for layer, pair in layers.items():
                per_layer.setdefault(layer, []).append(pair)
            for i, stat in enumerate(("mean", "var")):
                out[f"{name}.{stat} error.step {step}"] = count(_mean(p[i] for p in layers.values()), "1")
        for layer, pairs in per_layer.items():
            for i, stat in enumerate(("mean", "var")):
                out[f"{name}.{stat} error.layer {layer}"] = count(_mean(p[i] for p in pairs), "1")
        for i, stat in enumerate(("mean", "var")):
            out[f"{name}.{stat} error"] = count(_mean(p[i] for pairs in per_layer.values() for p in pairs), "1")
    for key in dict.fromkeys(k for ratios in truncation for k in ratios):
        out[f"truncation {key}"] = count(_mean(r[key] for r in truncation if key in r), "1")
    for name, values in losses.items():
        tail = values[-max(1, len(values) // 10):]
        out[f"{name}.final loss"] = count(_mean(tail), "1")
    return out


HEADLINE = [f"{v}.{s} error" for v in ESTIMATORS for s in ("mean", "var")] + [f"{v}.final loss" for v in VARIANTS] \
    + ["cbn.negative variance rate"]


def _over_seeds(per_seed: list[dict[str, Metric]]) -> dict[str, Metric]:
    """Every figure as its mean over the seeds that have it; the headline ones also as their
    standard deviation over seeds (" sd")."""
    out = {}
    for name in dict.fromkeys(n for found in per_seed for n in found):
        values = [found[name].value for found in per_seed if name in found]
        out[name] = count(_mean(values), "1")
        if name in HEADLINE:
            out[name + " sd"] = count(stats.stdev(values) if len(values) > 1 else 0.0, "1")
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def build(case: Case, device: str) -> StatisticsWorkload:
    return StatisticsWorkload(case.settings, device)


# ---------------------------------------------------------------------- reporting (in the runner)
def derive(case_results: list[CaseResult]) -> list[Derived]:
    """Per case and statistic, CBN's error less the lower of BN's and Naive CBN's, paired by seed
    (mean and 95% t-interval over seeds); the note holds the verdict (see _verdict)."""
    out = []
    for case in case_results:
        if case.suite != NAME or case.status != "ok":
            continue
        for stat in ("mean", "var"):
            seeds = _seeds(case)
            if not seeds:
                continue
            cbn_err = [_value(case, f"seed {i}.cbn.{stat} error") for i in seeds]
            best_other = [min(_value(case, f"seed {i}.{v}.{stat} error") for v in ("bn", "naive_cbn")) for i in seeds]
            mean, low, high = paired_difference(cbn_err, best_other)
            out.append(Derived(error_id(case.case, stat), f"{case.case}: CBN - best other {stat} error", mean, low, high,
                               note=_verdict(low, high)))
    return out


def error_id(case: str, stat: str) -> FigureId:
    """CBN's error of stat ("mean" or "var") less the lower of BN's and Naive CBN's, in case."""
    return FigureId(NAME, f"{case}/cbn", f"{stat}_error", "minus:best_other")


def _verdict(low: float, high: float) -> str:
    if not math.isfinite(low):
        return "one seed: no interval"
    if high < 0:
        return "lower beyond noise"
    return "higher beyond noise" if low > 0 else "within noise"


def _seeds(case: CaseResult) -> list[int]:
    return sorted({int(name.split(".")[0].removeprefix("seed ")) for name in case.metrics if name.startswith("seed ")})


def _ok(run: RunResult) -> list[CaseResult]:
    return [c for c in run.cases_of(NAME) if c.status == "ok"]


def _value(case: CaseResult, name: str) -> float | None:
    metric = case.metrics.get(name)
    return None if metric is None else metric.value


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    p = _settings(cases_here[0]).profile
    where = (f"{p.model}, {p.batch} x {p.image_px} px per step, {p.steps} SGD steps, {p.seeds} seed(s), "
             f"on {run.environment.device_name}")
    return [_error_table(run, where), _truncation_table(run, where), *_layer_table(run, where)]


def _error_table(run: RunResult, where: str) -> Table:
    derived = run.derived_of(NAME)
    rows = []
    for case in run.cases_of(NAME):
        head = _head(case)
        if case.status != "ok":
            rows.append(head + [case.status, (case.error or "")[:60]] + [""] * 11)
            continue
        errors = [_with_sd(case, f"{v}.{s} error") for v in ESTIMATORS for s in ("mean", "var")]
        rate = _value(case, "cbn.negative variance rate")
        rows.append(head + errors + [_lowest_seeds(case), _noise_verdict(case, derived),
                                     "-" if rate is None else f"{rate:.1%}"]
                    + [_with_sd(case, f"{v}.final loss") for v in VARIANTS])
    columns = ["regime", "lr", "k"] + [f"{LABELS[v]} {s} err" for v in ESTIMATORS for s in ("mu", "var")] \
        + ["CBN lowest", "beyond noise", "neg. var."] + [f"loss {LABELS[v]}" for v in VARIANTS]
    caption = [
        "err: of the mean and the variance a norm normalized with in a training step, against the statistics of "
        "the window's k x m examples under that step's weights, every layer normalizing as in that step: "
        "mu ||mu - mu_true|| / ||sigma_true||, var ||var - var_true|| / ||var_true|| over a layer's channels; "
        "averaged over the layers and the measured steps; mean +- sd over seeds",
        "CBN lowest: seeds in which CBN's mean and variance errors are both at most BN's and Naive CBN's; beyond "
        "noise: CBN's error less the lower of the others', paired by seed, for mu and var: 'lower'/'higher' when "
        "the 95% t-interval over seeds excludes 0, else 'within noise'",
        "neg. var.: share of CBN's compensated window entries (past step x channel) whose variance came out negative "
        "(Eq. 10 clamps them to 0); regime scratch: from random weights; settled: after a BN burn-in of "
        "settle_steps on the same batches",
        "loss: training loss, mean of the last tenth of the steps (BN (k x batch) sees k times the examples per step)",
    ]
    return Table(f"Statistics estimation error, profile {run.profile}: {where}", columns, rows, caption)


def _with_sd(case: CaseResult, name: str) -> str:
    value, sd = _value(case, name), _value(case, name + " sd")
    if value is None:
        return "-"
    return f"{value:.3g}" if sd is None else f"{value:.3g} +- {sd:.2g}"


def _lowest_seeds(case: CaseResult) -> str:
    seeds: list[int | None] = list(_seeds(case)) or [None]  # None: a file from before seeds, its one run

    def error(seed: int | None, variant: str, stat: str) -> float:
        return _value(case, f"{variant}.{stat} error" if seed is None else f"seed {seed}.{variant}.{stat} error")

    lowest = sum(all(error(i, "cbn", s) <= min(error(i, "bn", s), error(i, "naive_cbn", s)) for s in ("mean", "var"))
                 for i in seeds)
    return f"{lowest}/{len(seeds)}"


def _noise_verdict(case: CaseResult, derived: dict[FigureId, Derived]) -> str:
    found = [derived.get(error_id(case.case, s)) for s in ("mean", "var")]
    if any(d is None for d in found):
        return "-"
    return "; ".join(f"{s}: {d.note.removesuffix(' beyond noise')}" for s, d in zip(("mu", "var"), found))


def _truncation_table(run: RunResult, where: str) -> Table:
    keys = ("mu r=1", "nu r=1", "mu r=2", "nu r=2")
    rows = [_head(c) + [_fmt(_value(c, f"truncation {k}")) for k in keys] for c in _ok(run)]
    rows.append(["paper", "", "", *(_fmt(PAPER_TRUNCATION.get(k)) for k in keys)])
    caption = ["||d s^l / d theta^(l-r)||_F / ||d s^l / d theta^l||_F, s = mu or nu = E[x^2] of norm layer l's input, "
               "theta^l the conv that feeds it, r layers back in execution order (pairs where that conv does not feed "
               "l are left out); on the CBN copy's weights with BN statistics of one batch, averaged over layers and "
               "the first measured steps of the first seed; Frobenius norms from random probes"]
    return Table(f"Taylor truncation ratios, profile {run.profile}: {where}", ["regime", "lr", "k", *keys], rows, caption)


def _layer_table(run: RunResult, where: str) -> list[Table]:
    tables_out = []
    for regime, here in _by_regime(_ok(run)).items():
        case = _showcase(here)
        prefix = "cbn.mean error.layer "
        layers = [name.removeprefix(prefix) for name in case.metrics if name.startswith(prefix)]
        rows = [[layer] + [_fmt(_value(case, f"{v}.{s} error.layer {layer}")) for v in ESTIMATORS for s in ("mean", "var")]
                + [_percent(_value(case, f"cbn.negative variance rate.layer {layer}"))] for layer in layers]
        columns = ["layer"] + [f"{LABELS[v]} {s} err" for v in ESTIMATORS for s in ("mu", "var")] + ["CBN neg. var."]
        title = f"Estimation error per layer, {regime}, {_k_and_lr(case)}, profile {run.profile}: {where}"
        tables_out.append(Table(title, columns, rows, ["averaged over the measured steps and the seeds"]))
    return tables_out


def _by_regime(cases_here: list[CaseResult]) -> dict[str, list[CaseResult]]:
    out: dict[str, list[CaseResult]] = {}
    for case in cases_here:
        out.setdefault(_settings(case).regime, []).append(case)
    return out


def _showcase(ok: list[CaseResult]) -> CaseResult:
    """The case shown per layer and per step: k = 4 (the paper's) if measured, at the lowest lr."""
    return min(ok, key=lambda c: (abs(_settings(c).window - 4), _settings(c).lr))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def figures(run: RunResult, stem: Path) -> list[Path]:
    ok = _ok(run)
    if not ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for regime, here_all in _by_regime(ok).items():
        by_window, ax_pair = plt.subplots(1, 2, figsize=(11, 4.2))
        for lr, style in zip(sorted({_settings(c).lr for c in here_all}), ("-", "--", ":")):
            here = sorted((c for c in here_all if _settings(c).lr == lr), key=lambda c: _settings(c).window)
            for ax, stat in zip(ax_pair, ("mean", "var")):
                for v in ESTIMATORS:
                    ax.errorbar([_settings(c).window for c in here], [_value(c, f"{v}.{stat} error") for c in here],
                                yerr=[_value(c, f"{v}.{stat} error sd") or 0.0 for c in here], capsize=3,
                                marker="o", linestyle=style, label=f"{LABELS[v]}, lr {lr:g}")
        _finish_axes(ax_pair, "window size k", by_window,
                     f"Statistics error against window size, {regime}, mean +- sd over seeds ({run.profile})")
        paths.append(_save(by_window, stem.with_name(f"{stem.name}_statistics_window_{regime}.png")))

        case = _showcase(here_all)
        by_step, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, stat in zip(axes, ("mean", "var")):
            for v in ESTIMATORS:
                points = _by_step(case, f"{v}.{stat} error.step ")
                ax.plot([s for s, _ in points], [e for _, e in points], marker="o", label=LABELS[v])
        _finish_axes(axes[:2], "training step", by_step, f"Statistics error against training step, {regime}, "
                                                         f"{_k_and_lr(case)} ({run.profile})")
        points = _by_step(case, "cbn.negative variance rate.step ")
        axes[2].plot([s for s, _ in points], [r for _, r in points], marker="o", color="tab:red")
        axes[2].set_xlabel("training step")
        axes[2].set_ylabel("CBN: share of window entries with negative variance")
        axes[2].grid(True, alpha=0.3)
        paths.append(_save(by_step, stem.with_name(f"{stem.name}_statistics_steps_{regime}.png")))
    plt.close("all")
    return paths


def _by_step(case: CaseResult, prefix: str) -> list[tuple[int, float]]:
    return sorted((int(name.removeprefix(prefix)), m.value) for name, m in case.metrics.items() if name.startswith(prefix))


def _finish_axes(axes, xlabel: str, fig, title: str) -> None:
    for ax, label in zip(axes, ("error of the mean (in true std)", "relative error of the variance")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path
