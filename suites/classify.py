"""Classification backbones, the paper's ImageNet setting: torchvision ResNet-18 and ResNet-50 at
224x224 with 4 images per device, every BatchNorm2d replaced by the norm under test. The same
columns as table6 (memory, FLOPs, training and inference speed, ratios to BN) and the same check
that CBN's extra time is its extra FLOPs. In a backbone with no detection heads, CBN's own
bookkeeping is a larger share of the step than in table6, so this is where its overhead shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import cbn
from bench import ranks, training_modes
from bench.metrics import Collected
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.suite import Case, Measurement, Table, resolve_options, settings_of
from suites import ratios
from suites.constants import CLASSIFY_STEP_TIME_OVER_FLOPS_TARGET, CONTROL, WINDOW
from suites.constants import default_profile as default_profile  # the Suite contract's, shared
from suites.workload import TrainingWorkload, mode_caption, processes_caption

NAME = "classify"


@dataclass(frozen=True)
class Profile:
    image_px: int
    images_per_device: int
    warmup_steps: int
    rounds: int
    timeout_s: float
    models: tuple[str, ...] = ("resnet18", "resnet50")  # keys of MODELS
    norms: tuple[str, ...] = ("bn", "gn", "cbn", "naive_cbn", CONTROL)  # keys of NORMS
    kept_per_round: int = 1  # training and inference samples kept per round (bench/sampling.py)


PROFILES = {
    "paper": Profile(224, 4, warmup_steps=10, rounds=6, timeout_s=300, kept_per_round=4),
    # 15 rounds on a CPU (a round takes a few seconds): with 5, each median rested on 5 samples and
    # its bootstrap interval looked tighter than it was.
    "cpu": Profile(224, 4, warmup_steps=1, rounds=15, timeout_s=900),
    # What the CI gate runs: ResNet-18, the norms whose ratios it guards.
    "quick": Profile(224, 4, warmup_steps=1, rounds=15, timeout_s=600, models=("resnet18",),
                     norms=("bn", "gn", "cbn", CONTROL)),
    "smoke": Profile(64, 2, warmup_steps=1, rounds=2, timeout_s=300, models=("resnet18",)),
}
MODELS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
# case norm -> (cbn.norm_layer name, options, label)
NORMS = {
    "bn": ("bn", {}, "BN"),
    "gn": ("gn", {}, "GN"),
    "cbn": ("cbn", {"window": WINDOW}, f"CBN k={WINDOW}"),
    "naive_cbn": ("naive_cbn", {"window": WINDOW}, f"Naive CBN k={WINDOW}"),
    CONTROL: ("bn", {}, "BN (A/A control)"),  # BN again: its ratios to BN are the run's noise
}
OPTIONS = dict(training_modes.OPTIONS)
COUNTS: dict[str, str] = {}  # counted in each run: a classification step is cheap to count
LR = 0.1 * 4 / 256  # the paper's ImageNet rate (0.1 per 256 images), scaled to 4 images


@dataclass(frozen=True)
class Settings:
    """One case: the profile, the model (a key of MODELS) and the norm (a key of NORMS)."""

    profile: Profile
    model: str
    norm: str
    window: int = WINDOW  # CBN's k


SETTINGS = Settings


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    mode = training_modes.Mode.from_options(resolve_options(NAME, OPTIONS, options)).check(device)
    p = PROFILES[profile]
    return [
        Case(NAME, f"{model}/{name}", Settings(p, model, name), mode,
             group=model, rounds=p.rounds, timeout_s=p.timeout_s, kept_per_round=p.kept_per_round)
        for model in p.models for name in p.norms
    ]


def build_model(model: str, norm: str) -> nn.Module:
    kind, options, _ = NORMS[norm]
    torch.manual_seed(0)
    net = MODELS[model](weights=None, norm_layer=cbn.norm_layer(kind, **options))
    if kind in ("cbn", "naive_cbn"):
        cbn.convert(net)  # binds each CBN layer to the conv that feeds it
    return net


# ---------------------------------------------------------------------- the workload (in the worker)
class ClassifyWorkload(TrainingWorkload):
    def __init__(self, case: Case, device: str) -> None:
        s: Settings = case.settings
        self.profile = p = s.profile
        self.device = torch.device(device)
        self.model = build_model(s.model, s.norm).to(self.device)
        gen = torch.Generator().manual_seed(ranks.rank())  # each rank its own images
        self.images = torch.rand(p.images_per_device, 3, p.image_px, p.image_px, generator=gen).to(self.device)
        self.labels = torch.randint(0, 1000, (p.images_per_device,), generator=gen).to(self.device)
        self.distribute()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
        self.steps_done = 0
        self.mode = case.mode or training_modes.Mode()
        self.enter_mode()

    def loss(self) -> torch.Tensor:
        self.model.train()
        return nn.functional.cross_entropy(self.trained()(self.images), self.labels)

    def measure(self) -> Measurement:
        """FLOPs, memory and structure, each metric on its own (a failing one is recorded as missing)."""
        for _ in range(WINDOW + 1):  # CBN's window is full from here on
            self.train_step()
        notes: list[str] = []
        found = Collected()
        self.count_training(found, notes)
        self.count_inference(found, lambda: self.model(self.images))
        found.attempt(("memory",), lambda: self.memory(notes))
        return Measurement({**found.metrics, **self.structure()}, notes, missing=found.missing)


def build(case: Case, device: str) -> ClassifyWorkload:
    return ClassifyWorkload(case, device)


# ---------------------------------------------------------------------- reporting (in the runner)
def derive(case_results: list[CaseResult]) -> list[Derived]:
    out = []
    settings = {c.case: settings_of(Settings, c) for c in case_results}
    for model in dict.fromkeys(s.model for s in settings.values()):
        by_norm = {settings[c.case].norm: c for c in case_results if settings[c.case].model == model and c.status == "ok"}
        bn = by_norm.get("bn")
        if bn is None:
            continue
        out += [d for norm, case in by_norm.items() if norm != "bn" for d in ratios.to_bn(NAME, case, bn)]
        if CONTROL in by_norm:
            out += ratios.control_checks(NAME, by_norm[CONTROL], bn)
        if "cbn" in by_norm:
            out += ratios.step_time_over_flops(NAME, by_norm["cbn"], bn)
    return out


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    derived = run.derived_of(NAME)
    out = []
    settings = {c.case: settings_of(Settings, c) for c in cases_here}
    for model in dict.fromkeys(s.model for s in settings.values()):
        here = [c for c in cases_here if settings[c.case].model == model]
        rows = [_row(c, settings[c.case], derived) for c in here]
        first = here[0]
        p = settings[first.case].profile
        title = (f"Classification, profile {run.profile}: {_model_label(model)}, every BN replaced, "
                 f"{p.images_per_device} x {p.image_px}x{p.image_px} images, {(first.mode or training_modes.Mode()).label}, "
                 f"on {run.environment.device_name}{first.processes.label}")
        out.append(Table(title, ["norm", *ratios.COLUMNS], rows, _caption(run, here, settings, derived)))
    return out


def _model_label(model: str) -> str:
    return {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}.get(model, model)


def _row(case: CaseResult, settings: Settings, derived: dict[FigureId, Derived]) -> list[str]:
    label = _norm_label(settings.norm)
    if case.status != "ok":
        return [label, *ratios.failed_cells(case)]
    return [label, *ratios.cells(case, derived)]


def _norm_label(norm: str) -> str:
    return NORMS[norm][2] if norm in NORMS else norm


def _caption(run: RunResult, cases_here: list[CaseResult], settings: dict[str, Settings],
             derived: dict[FigureId, Derived]) -> list[str]:
    model = settings[cases_here[0].case].model
    lines = [
        "memory: " + ("torch.cuda.max_memory_allocated over one training step" if run.device == "cuda" else
                      "counted bytes a training step holds: parameters, gradients, SGD momentum, tensors saved "
                      "for backward, CBN history"),
        "fwd GMAC: fvcore, training-mode forward incl. CBN's statistic gradients; train-step GFLOP: torch "
        "FlopCounterMode, forward + backward + CBN's extra convolutions, 2 flops per multiply-add",
        f"iter/s: 1 / median of {ratios.samples(cases_here)} samples from {ratios.rounds(cases_here)} interleaved rounds "
        f"({ratios.sampling_text(cases_here, run.device)}); ratios to BN paired by round (geometric mean of the "
        "rounds' ratios, 95% t-interval); random weights, synthetic images, SGD with momentum; GN: 32 groups",
        *mode_caption(cases_here[0].mode or training_modes.Mode(), "the whole model"),
        *processes_caption(cases_here[0].processes),
    ]
    lines += ratios.control_caption(NAME, f"{model}/", derived, run.device)
    lines += ratios.census_lines(cases_here, lambda c: _norm_label(settings[c.case].norm))
    lines += ratios.missing_lines(cases_here, lambda c: _norm_label(settings[c.case].norm))
    check = derived.get(ratios.step_time_over_flops_id(NAME, f"{model}/cbn"))
    if check is not None:
        target = CLASSIFY_STEP_TIME_OVER_FLOPS_TARGET["cpu" if run.device == "cpu" else "cuda"]
        lines.append(ratios.verdict(check, target, run.device, enforced=False))
    return lines


def figures(run: RunResult, stem: Path) -> list[Path]:
    return []  # tables only
