"""CBN's premise, measured: how well each norm's statistics estimate those of the examples in its
window under the current weights (paper Fig. 3-4), and whether truncating the Taylor term to the
layer's own conv is justified (Fig. 6: about 0.12 for mu and 0.39 for nu on ResNet).

Each case (a window k and a learning rate) trains four copies of one backbone from the same initial
weights, side by side on the same natural-image batches (suites/images.py) with SGD: BN on m images
per step, BN on the k*m images of the window (the paper's upper bound), Naive CBN (k) and CBN (k) on
m. Every ``measure_every`` steps, for BN, Naive CBN and CBN, each norm layer's statistics as used in
that step's forward are compared with the statistics of the window's k*m examples recomputed under
the weights of that step, every layer normalizing as in that step, so that each layer's error is
its own (suites/estimation.py); on the CBN copy, the truncation ratios. Nothing is
timed; the figures repeat for the same settings, seed and versions.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import cbn
from bench.metrics import Metric, count
from bench.results import CaseResult, Derived, RunResult, write_atomic
from bench.suite import Case, Measurement, Table, stored_profile
from suites import estimation, images

NAME = "statistics"
VARIANTS = ("bn", "bn_km", "naive_cbn", "cbn")  # trained side by side in every case
ESTIMATORS = ("bn", "naive_cbn", "cbn")  # whose statistics are compared with the window's
LABELS = {"bn": "BN", "bn_km": "BN (k x batch)", "naive_cbn": "Naive CBN", "cbn": "CBN"}
PAPER_TRUNCATION = {"mu r=1": 0.12, "nu r=1": 0.39}  # Fig. 6, ResNet on ImageNet
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4


@dataclass(frozen=True)
class Profile:
    model: str  # key of MODELS
    image_px: int
    batch: int  # images per step, m
    steps: int
    windows: tuple[int, ...]
    learning_rates: tuple[float, ...]
    measure_every: int  # steps between measurements; the first at step measure_every (window full)
    truncation_points: int  # the first this many measurements also give truncation ratios
    probes: int  # random directions per Frobenius-norm estimate (estimation.truncation_ratios)
    timeout_s: float


PROFILES = {
    "paper": Profile("resnet50_fpn", 224, 4, 300, (2, 4, 8), (0.01, 0.05), 50, 3, 16, timeout_s=1800),
    "cpu": Profile("resnet18", 64, 4, 100, (2, 4, 8), (0.01, 0.05), 20, 2, 8, timeout_s=900),
    "quick": Profile("resnet18", 32, 2, 40, (2, 4), (0.02,), 10, 1, 4, timeout_s=600),
    "smoke": Profile("resnet18", 32, 2, 12, (2, 4), (0.02,), 6, 1, 2, timeout_s=300),
}
OPTIONS: dict[str, tuple[str, ...]] = {}
COUNTS: dict[str, str] = {}  # nothing to reuse across runs


def default_profile(device: str) -> str:
    return "paper" if device == "cuda" else "cpu"


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    p = PROFILES[profile]
    return [Case(NAME, f"k{k}-lr{lr:g}", {"profile": profile, "settings": settings(p), "window": k, "lr": lr},
                 rounds=0, timeout_s=p.timeout_s)
            for lr in p.learning_rates for k in p.windows]


def settings(p: Profile) -> dict:
    """What a case is measured with, stored in its params so results render without today's PROFILES."""
    return {**dataclasses.asdict(p), "windows": list(p.windows), "learning_rates": list(p.learning_rates),
            "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "samples": list(images.SAMPLES)}


def profile_of(params: dict) -> Profile:
    return stored_profile(Profile, params, {})


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


def variants(model: str, window: int, num_classes: int) -> dict[str, nn.Module]:
    """The four copies, one initial model: the CBN ones converted from a copy of the BN one."""
    torch.manual_seed(0)
    bn = MODELS[model](num_classes)
    return {
        "bn": bn,
        "bn_km": copy.deepcopy(bn),
        "naive_cbn": cbn.convert(copy.deepcopy(bn), window=window, compensate=False),
        "cbn": cbn.convert(copy.deepcopy(bn), window=window),
    }


# ---------------------------------------------------------------------- the workload (in the worker)
class StatisticsWorkload:
    def __init__(self, params: dict, device: str) -> None:
        self.p = profile_of(params)
        self.k, self.lr = params["window"], params["lr"]
        self.device = torch.device(device)
        self.models = {name: m.to(self.device) for name, m in variants(self.p.model, self.k, len(images.SAMPLES)).items()}
        self.twin = copy.deepcopy(self.models["bn"])  # the BatchNorm twin the truth passes run in
        self.convs = estimation.conv_of_norm(self.models["cbn"])
        self.optimizers = {name: torch.optim.SGD(m.parameters(), lr=self.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
                           for name, m in self.models.items()}
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def measure(self) -> Measurement:
        errors: dict[str, dict[int, dict[str, tuple[float, float]]]] = {v: {} for v in ESTIMATORS}
        truncation: list[dict[str, float]] = []
        losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for step in range(self.p.steps):
            self.batches = (self.batches + [self._batch(step)])[-self.k:]  # the window's batches
            measured = step >= self.k - 1 and step > 0 and step % self.p.measure_every == 0  # a full window
            for name in VARIANTS:
                used, loss = self._train_step(name, record=measured and name in ESTIMATORS)
                losses[name].append(loss)
                if used is not None:
                    truth = estimation.window_truth(self.twin, self.models[name], self._window_images(), used)
                    errors[name][step] = {layer: estimation.relative_errors(used[layer], truth[layer]) for layer in used}
                self.optimizers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
            if measured and len(truncation) < self.p.truncation_points:
                truncation.append(self._truncation(step))
        notes = [f"{self.p.model}, {self.p.batch} x {self.p.image_px} px per step, {self.p.steps} SGD steps, "
                 f"errors at steps {sorted(errors['cbn'])}"]
        return Measurement(_metrics(errors, truncation, losses), notes)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images.batch(step, self.p.batch, self.p.image_px)
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
            return None, float(loss)
        with estimation.UsedStatistics(model) as used:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return used.stats, float(loss)

    def _truncation(self, step: int) -> dict[str, float]:
        self.twin.load_state_dict(self.models["cbn"].state_dict(), strict=False)
        gen = torch.Generator().manual_seed(step)
        ratios = estimation.truncation_ratios(self.twin, self.convs, self.batches[-1][0], probes=self.p.probes, generator=gen)
        self.twin.zero_grad(set_to_none=True)
        return ratios

    def warmup(self) -> None:
        pass  # nothing is timed

    def timed_round(self, kept: int, discarded: int) -> dict[str, list[float]]:
        return {}


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


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def build(case: Case, device: str) -> StatisticsWorkload:
    return StatisticsWorkload(case.params, device)


# ---------------------------------------------------------------------- reporting (in the runner)
def derive(case_results: list[CaseResult]) -> list[Derived]:
    return []  # every figure is a case metric; nothing is compared across cases


def _ok(run: RunResult) -> list[CaseResult]:
    return [c for c in run.cases_of(NAME) if c.status == "ok"]


def _value(case: CaseResult, name: str) -> float | None:
    metric = case.metrics.get(name)
    return None if metric is None else metric.value


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    p = profile_of(cases_here[0].params)
    where = f"{p.model}, {p.batch} x {p.image_px} px per step, {p.steps} SGD steps, on {run.environment.device_name}"
    return [_error_table(run, where), _truncation_table(run, where), *_layer_table(run, where)]


def _error_table(run: RunResult, where: str) -> Table:
    rows = []
    for case in run.cases_of(NAME):
        head = [f"{case.params['lr']:g}", str(case.params["window"])]
        if case.status != "ok":
            rows.append(head + [case.status, (case.error or "")[:60]] + [""] * 8)
            continue
        errs = {v: (_value(case, f"{v}.mean error"), _value(case, f"{v}.var error")) for v in ESTIMATORS}
        lowest = all(errs["cbn"][i] <= min(errs["bn"][i], errs["naive_cbn"][i]) for i in (0, 1))
        rows.append(head + [f"{e:.3g}" for v in ESTIMATORS for e in errs[v]] + ["yes" if lowest else "NO"]
                    + [f"{_value(case, f'{v}.final loss'):.3g}" for v in VARIANTS])
    columns = ["lr", "k"] + [f"{LABELS[v]} {s} err" for v in ESTIMATORS for s in ("mu", "var")] + ["CBN lowest"] \
        + [f"loss {LABELS[v]}" for v in VARIANTS]
    caption = [
        "err: of the mean and the variance a norm normalized with in a training step, against the statistics of "
        "the window's k x m examples under that step's weights, every layer normalizing as in that step: "
        "mu ||mu - mu_true|| / ||sigma_true||, var ||var - var_true|| / ||var_true|| over a layer's channels; "
        "averaged over the layers and the measured steps",
        "CBN lowest: CBN's mean and variance errors both at most BN's and Naive CBN's; loss: training loss, "
        "mean of the last tenth of the steps (BN (k x batch) sees k times the examples per step)",
    ]
    return Table(f"Statistics estimation error, profile {run.profile}: {where}", columns, rows, caption)


def _truncation_table(run: RunResult, where: str) -> Table:
    keys = ("mu r=1", "nu r=1", "mu r=2", "nu r=2")
    rows = [[f"{c.params['lr']:g}", str(c.params["window"])] + [_fmt(_value(c, f"truncation {k}")) for k in keys]
            for c in _ok(run)]
    rows.append(["paper", "", *(_fmt(PAPER_TRUNCATION.get(k)) for k in keys)])
    caption = ["||d s^l / d theta^(l-r)||_F / ||d s^l / d theta^l||_F, s = mu or nu = E[x^2] of norm layer l's input, "
               "theta^l the conv that feeds it, r layers back in execution order (pairs where that conv does not feed "
               "l are left out); on the CBN copy's weights with BN statistics of one batch, averaged over layers and "
               "the first measured steps; Frobenius norms from random probes"]
    return Table(f"Taylor truncation ratios, profile {run.profile}: {where}", ["lr", "k", *keys], rows, caption)


def _layer_table(run: RunResult, where: str) -> list[Table]:
    ok = _ok(run)
    if not ok:
        return []
    case = _showcase(ok)
    prefix = "cbn.mean error.layer "
    layers = [name.removeprefix(prefix) for name in case.metrics if name.startswith(prefix)]
    rows = [[layer] + [f"{_value(case, f'{v}.{s} error.layer {layer}'):.3g}" for v in ESTIMATORS for s in ("mean", "var")]
            for layer in layers]
    columns = ["layer"] + [f"{LABELS[v]} {s} err" for v in ESTIMATORS for s in ("mu", "var")]
    title = f"Estimation error per layer, k={case.params['window']}, lr={case.params['lr']:g}, profile {run.profile}: {where}"
    return [Table(title, columns, rows, ["averaged over the measured steps"])]


def _showcase(ok: list[CaseResult]) -> CaseResult:
    """The case shown per layer and per step: k = 4 (the paper's) if measured, at the lowest lr."""
    return min(ok, key=lambda c: (abs(c.params["window"] - 4), c.params["lr"]))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def figures(run: RunResult, stem: Path) -> list[Path]:
    ok = _ok(run)
    if not ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_window, ax_pair = plt.subplots(1, 2, figsize=(11, 4.2))
    for lr, style in zip(sorted({c.params["lr"] for c in ok}), ("-", "--", ":")):
        here = sorted((c for c in ok if c.params["lr"] == lr), key=lambda c: c.params["window"])
        for ax, stat in zip(ax_pair, ("mean", "var")):
            for v in ESTIMATORS:
                ax.plot([c.params["window"] for c in here], [_value(c, f"{v}.{stat} error") for c in here],
                        marker="o", linestyle=style, label=f"{LABELS[v]}, lr {lr:g}")
    _finish_axes(ax_pair, "window size k", by_window, f"Statistics error against window size ({run.profile})")
    paths.append(_save(by_window, stem.with_name(stem.name + "_statistics_window.png")))

    case = _showcase(ok)
    by_step, ax_pair = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, stat in zip(ax_pair, ("mean", "var")):
        for v in ESTIMATORS:
            prefix = f"{v}.{stat} error.step "
            points = sorted((int(name.removeprefix(prefix)), m.value) for name, m in case.metrics.items() if name.startswith(prefix))
            ax.plot([s for s, _ in points], [e for _, e in points], marker="o", label=LABELS[v])
    _finish_axes(ax_pair, "training step", by_step, f"Statistics error against training step, k={case.params['window']}, "
                                                   f"lr={case.params['lr']:g} ({run.profile})")
    paths.append(_save(by_step, stem.with_name(stem.name + "_statistics_steps.png")))
    plt.close("all")
    return paths


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
