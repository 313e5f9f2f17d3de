"""Table 6 of the CBN paper, reproduced and extended: memory, FLOPs, training and inference speed of
each norm in a detection model, with ratios to BN and the paper's ratios beside them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import counts, flops, memory, report
from bench.metrics import Metric, count, peak
from bench.results import CaseResult, Derived, RunResult
from bench.stats import ratio_of_medians
from bench.suite import Case, Measurement, Table, stored_profile
from bench.timing import synchronize, time_call
from suites.constants import STEP_TIME_OVER_FLOPS, STEP_TIME_OVER_FLOPS_TARGET, WINDOW
from suites.data import synthetic_batch
from suites.models import DetectorSpec, ProposalsAroundObjects, build_detector

NAME = "table6"


@dataclass(frozen=True)
class Profile:
    height_px: int
    width_px: int
    images_per_device: int
    sampled_rois_per_image: int
    proposals_per_image: int
    warmup_steps: int
    rounds: int
    timeout_s: float
    norms: tuple[str, ...] = ("bn", "gn", "syncbn", "cbn", "naive_cbn", "none")  # keys of NORMS
    kept_per_round: int = 1  # training and inference samples kept per round (bench/sampling.py)


PROFILES = {
    # 6 norms x 6 rounds x (1 discarded + 2 kept) steps: about 5 minutes on one H100 (tools/gpu_run.py)
    "paper": Profile(800, 1333, 4, 512, 2000, warmup_steps=5, rounds=6, timeout_s=420, kept_per_round=2),
    "cpu": Profile(320, 320, 2, 128, 300, warmup_steps=1, rounds=5, timeout_s=900),
    # What the CI gate runs: the norms whose ratios it guards, at a size that takes ~2 minutes on 2 cores.
    "quick": Profile(256, 256, 1, 64, 200, warmup_steps=1, rounds=7, timeout_s=600, norms=("bn", "gn", "cbn")),
    "smoke": Profile(96, 96, 1, 16, 50, warmup_steps=1, rounds=2, timeout_s=300),
}

# The profiles while results files stored only a profile's name (up to commit 697dbca); do not edit.
LEGACY_PROFILES = {
    "paper": Profile(800, 1333, 4, 512, 2000, warmup_steps=10, rounds=20, timeout_s=900),
    "cpu": Profile(320, 320, 2, 128, 300, warmup_steps=1, rounds=5, timeout_s=900),
    "quick": Profile(256, 256, 1, 64, 200, warmup_steps=1, rounds=7, timeout_s=600, norms=("bn", "gn", "cbn")),
    "smoke": Profile(96, 96, 1, 16, 50, warmup_steps=1, rounds=2, timeout_s=300),
}

# case name -> (norm, options, label); the paper's ratios to BN: memory, FLOPs, train, inference
NORMS = {
    "bn": ("bn", {}, "BN"),
    "gn": ("gn", {}, "GN"),
    "syncbn": ("syncbn", {}, "SyncBN*"),
    "cbn": ("cbn", {"window": WINDOW}, f"CBN k={WINDOW}"),
    "naive_cbn": ("naive_cbn", {"window": WINDOW}, f"Naive CBN k={WINDOW}"),
    "none": ("none", {}, "- (no norm)"),
}
PAPER_RATIOS = {"gn": (1.00, 1.023, 0.92, 0.60), "cbn": (1.07, 1.127, 0.77, 1.00)}
OPTIONS = {"arch": ("mask_rcnn", "faster_rcnn"), "depth": ("50", "101"), "placement": ("heads", "all")}
BASE_LR = 0.02
COUNTS = {"train_step_flops": "flop", "forward_macs": "mac", "inference_forward_macs": "mac"}  # device-independent


def default_profile(device: str) -> str:
    return "paper" if device == "cuda" else "cpu"


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    options = _check_options(options or {})
    p = PROFILES[profile]
    out = []
    for name in p.norms:
        norm, norm_options, _ = NORMS[name]
        if norm == "none" and options["placement"] == "all":
            continue  # "no norm" has no backbone variant
        params = {"profile": profile, "settings": settings(p), "norm": norm, "norm_options": norm_options, **options}
        out.append(Case(NAME, name, params, group=NAME, rounds=p.rounds, timeout_s=p.timeout_s,
                        kept_per_round=p.kept_per_round))
    return out


def settings(p: Profile) -> dict:
    """What a case is measured with, stored in its params so results render without today's PROFILES."""
    return {**dataclasses.asdict(p), "norms": list(p.norms), "window": WINDOW}


def profile_of(params: dict) -> Profile:
    return stored_profile(Profile, params, LEGACY_PROFILES)


def _check_options(options: dict[str, str]) -> dict[str, str]:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"table6 has no option {', '.join(sorted(unknown))}; it takes {', '.join(OPTIONS)}")
    chosen = {key: options.get(key, values[0]) for key, values in OPTIONS.items()}
    for key, value in chosen.items():
        if value not in OPTIONS[key]:
            raise ValueError(f"table6 option {key}={value!r}: choose one of {', '.join(OPTIONS[key])}")
    return chosen


# ---------------------------------------------------------------------- the workload (in the worker)
class DetectionWorkload:
    def __init__(self, params: dict, device: str) -> None:
        self.profile = profile_of(params)
        self.known_counts: dict | None = None
        self.steps_done = 0
        self.device = torch.device(device)
        p = self.profile
        spec = DetectorSpec(
            arch=params["arch"], depth=int(params["depth"]), norm=params["norm"], norm_options=params["norm_options"],
            placement=params["placement"], min_size_px=min(p.height_px, p.width_px), max_size_px=max(p.height_px, p.width_px),
            sampled_rois_per_image=p.sampled_rois_per_image, proposals_per_image=p.proposals_per_image, box_score_thresh=0.0,
            proposals_around_objects=len(ProposalsAroundObjects.SHIFTS),
        )
        torch.manual_seed(0)
        self.model = build_detector(spec).to(self.device)
        self.images, self.targets = synthetic_batch(p.images_per_device, p.height_px, p.width_px, seed=0, device=self.device)
        trainable = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=BASE_LR, momentum=0.9, weight_decay=1e-4)
        # Detectron's linear warm-up (factor 0.001 over 1000 iterations): the benchmark's few dozen
        # steps stay in it, so random-weight training does not diverge.
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=0.001, total_iters=1000)

    def loss(self) -> torch.Tensor:
        self.model.train()
        return sum(self.model(self.images, self.targets).values())

    def train_step(self) -> None:
        self.steps_done += 1
        self.loss().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def inference(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(self.images)

    def reuse_counts(self, entry: dict) -> None:
        self.known_counts = entry

    def measure(self) -> Measurement:
        for _ in range(WINDOW + 1):  # CBN's window is full from here on
            self.train_step()
        notes: list[str] = []
        if self.known_counts is not None:
            found = {name: self.known_counts["metrics"][name] for name in COUNTS}
            notes.append(counts.note(self.known_counts))
            torch.manual_seed(1)
            memory_metrics = self._memory(notes)
        else:
            found = {}
            torch.manual_seed(1)  # RoI sampling draws random numbers: fixed, so counts repeat exactly
            found["train_step_flops"] = flops.counted_flops(self.train_step)
            torch.manual_seed(1)
            found["forward_macs"], skipped = flops.fvcore_forward_flops(_TrainForward(self), ())
            self.train_step()  # ends the traced iteration with an optimizer step
            torch.manual_seed(1)
            memory_metrics = self._memory(notes)
            self.model.eval()
            found["inference_forward_macs"], _ = flops.fvcore_forward_flops(_InferenceForward(self), ())
            if skipped:
                notes.append("fvcore skipped (no FLOPs counted): " + ", ".join(sorted(skipped)))
        metrics = {name: count(value, COUNTS[name]) for name, value in found.items()}
        return Measurement({**metrics, **memory_metrics, **self._structure()}, notes)

    def _structure(self) -> dict[str, Metric]:
        return {"parameters": count(sum(q.numel() for q in self.model.parameters()), "1"),
                "cbn_layers": count(sum(1 for m in self.model.modules() if hasattr(m, "history_bytes")), "1")}

    def _memory(self, notes: list[str]) -> dict[str, Metric]:
        if self.device.type == "cuda":
            peaks, nvml_notes = memory.cuda_peak_memory(self.train_step, self.device)
            notes += nvml_notes
            return {name: peak(value) for name, value in peaks.items()}
        counted = memory.counted_training_memory(self.model, self.optimizer, self.loss)
        self.scheduler.step()
        return {**{name: count(value, "byte") for name, value in counted.items()},
                "peak_rss_bytes": peak(memory.peak_rss_bytes())}

    def warmup(self) -> None:
        for _ in range(max(self.profile.warmup_steps, WINDOW + 1 - self.steps_done)):  # and CBN's window full
            self.train_step()
        self.inference()
        self.inference()
        synchronize(self.device)

    def profiled_steps(self) -> dict[str, Callable[[], None]]:
        return {"train": self.train_step, "inference": self.inference}

    def timed_round(self) -> dict[str, float]:
        return {"train_step_time": time_call(self.train_step, self.device),
                "inference_time": time_call(self.inference, self.device)}


class _TrainForward(nn.Module):
    """The training forward as fvcore traces it: inputs held inside, the summed loss out."""

    def __init__(self, workload: DetectionWorkload) -> None:
        super().__init__()
        self.model = workload.model
        self._workload = [workload]

    def forward(self) -> torch.Tensor:
        return self._workload[0].loss()


class _InferenceForward(nn.Module):
    def __init__(self, workload: DetectionWorkload) -> None:
        super().__init__()
        self.model = workload.model
        self._images = workload.images

    def forward(self) -> list[torch.Tensor]:
        # GeneralizedRCNN.forward without transform.postprocess, on every device: torchvision's
        # traced mask pasting mixes CPU and CUDA tensors and fails on CUDA, and counts must not
        # depend on the device (they are stored and reused, bench/counts.py). Pasting masks into
        # the image is resampling, not the model's multiply-adds.
        m = self.model
        images, _ = m.transform(self._images)
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        detections, _ = m.roi_heads(features, proposals, images.image_sizes)
        return [d["boxes"] for d in detections]


def build(case: Case, device: str) -> DetectionWorkload:
    return DetectionWorkload(case.params, device)


# ---------------------------------------------------------------------- reporting (in the runner)
def memory_metric(case: CaseResult) -> Metric:
    """What the memory column shows: the allocator peak on CUDA, the counted bytes on CPU."""
    m = case.metrics
    return m["peak_allocated_bytes"] if "peak_allocated_bytes" in m else m["counted_total_bytes"]


def derive(case_results: list[CaseResult]) -> list[Derived]:
    by_name = {c.case: c for c in case_results if c.status == "ok"}
    bn = by_name.get("bn")
    if bn is None:
        return []
    out = []
    for name, case in by_name.items():
        if name == "bn":
            continue
        mem, mem_bn = memory_metric(case), memory_metric(bn)
        out.append(Derived(NAME, f"{name}/bn memory ratio", mem.value / mem_bn.value, kind=mem.kind))
        for metric in ("forward_macs", "train_step_flops"):
            out.append(Derived(NAME, f"{name}/bn {metric} ratio", case.metrics[metric].value / bn.metrics[metric].value))
        for timed, label in (("train_step_time", "train iter/s"), ("inference_time", "inference iter/s")):
            r = ratio_of_medians(bn.metrics[timed].samples, case.metrics[timed].samples)  # iter/s ratio = BN time / norm time
            out.append(Derived(NAME, f"{name}/bn {label} ratio", r.median, r.ci_low, r.ci_high, kind="timing"))
    if "cbn" in by_name:
        cbn = by_name["cbn"]
        time_ratio = cbn.metrics["train_step_time"].value / bn.metrics["train_step_time"].value
        flop_ratio = cbn.metrics["train_step_flops"].value / bn.metrics["train_step_flops"].value
        out.append(Derived(NAME, STEP_TIME_OVER_FLOPS, time_ratio / flop_ratio, kind="timing"))
    return out


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    derived = run.derived_of(NAME)
    params = cases_here[0].params
    p = profile_of(params)
    rows = [_row(c, derived) for c in cases_here]
    arch = "Mask R-CNN" if params["arch"] == "mask_rcnn" else "Faster R-CNN"
    title = (f"Table 6, profile {run.profile}: {arch} R{params['depth']}-FPN, norm in {_placement(params['placement'])}, "
             f"{p.images_per_device} x {p.width_px}x{p.height_px} images, {p.sampled_rois_per_image} RoIs/image, "
             f"on {run.environment.device_name}")
    columns = ["norm", "memory (xBN)", "fwd GMAC (xBN)", "train-step GFLOP (xBN)", "train iter/s (xBN [95% CI])",
               "infer iter/s (xBN [95% CI])", "paper xBN mem/FLOPs/train/infer"]
    return [Table(title, columns, rows, _caption(run, derived))]


def _placement(placement: str) -> str:
    return "FPN and heads, frozen BN backbone" if placement == "heads" else "FPN, heads and backbone stages 2-4"


def _row(case: CaseResult, derived: dict[str, Derived]) -> list[str]:
    label = NORMS[case.case][2]
    if case.status != "ok":
        reason = (case.error or "").splitlines()[0][:80] if case.error else ""
        return [label, f"{case.status}: {reason}", "", "", "", "", ""]
    m = case.metrics

    def ratio(metric: str) -> str:
        d = derived.get(f"{case.case}/bn {metric} ratio")
        return "1" if case.case == "bn" else ("-" if d is None else report.fmt_ratio(d.value, d.ci_low, d.ci_high))

    paper = PAPER_RATIOS.get(case.case)
    return [
        label,
        f"{report.fmt_bytes(memory_metric(case).value)} ({ratio('memory')})",
        f"{report.fmt(m['forward_macs'].value / 1e9, 4)} ({ratio('forward_macs')})",
        f"{report.fmt(m['train_step_flops'].value / 1e9, 4)} ({ratio('train_step_flops')})",
        f"{report.fmt(1 / m['train_step_time'].value)} ({ratio('train iter/s')})",
        f"{report.fmt(1 / m['inference_time'].value)} ({ratio('inference iter/s')})",
        "-" if paper is None else " / ".join(f"{v:.3g}" for v in paper),
    ]


def _samples(run: RunResult) -> int:
    return max((len(c.metrics["train_step_time"].samples) for c in run.cases_of(NAME) if "train_step_time" in c.metrics),
               default=0)


def _caption(run: RunResult, derived: dict[str, Derived]) -> list[str]:
    cuda = run.device == "cuda"
    lines = [
        "memory: " + ("torch.cuda.max_memory_allocated over one training step (NVML figures in the JSON)" if cuda else
                      "counted bytes a training step holds: parameters, gradients, SGD momentum, tensors saved for "
                      "backward, CBN history (peak RSS in the JSON)"),
        "fwd GMAC: fvcore, training-mode forward incl. CBN's cbn::conv_weight_grad, 1 multiply-add = 1 flop; "
        "train-step GFLOP: torch FlopCounterMode, forward + backward, 2 flops per multiply-add",
        f"iter/s: 1 / median of {_samples(run)} samples from interleaved rounds ({_sampling(run)}); "
        "ratios to BN with bootstrap 95% intervals; the paper's ratios are from its Table 6 (V100, 1333x800, 4 img/GPU)",
        "GN: 32 groups; CBN: efficient statistic-gradient path; -: frozen BN backbone and no norm in FPN and heads",
        "SyncBN*: one process, where SyncBN is plain BN: no synchronization is measured",
    ]
    check = derived.get(STEP_TIME_OVER_FLOPS)
    if check is not None:
        target = STEP_TIME_OVER_FLOPS_TARGET["cpu" if run.device == "cpu" else "cuda"]
        verdict = "within" if check.value <= target else "ABOVE"
        lines.append(f"CBN/BN step-time ratio / training-FLOP ratio = {check.value:.3f} "
                     f"({verdict} the {target:.2f} target on {run.device}, which the gate enforces too)")
    return lines


def _sampling(run: RunResult) -> str:
    how = next((c.sampling for c in run.cases_of(NAME) if c.sampling), {})
    if not how:
        return "sampling not recorded"
    text = f"{how['kept_per_round']} kept per round after {how['discarded_per_round']} discarded, order {how['order']}"
    return text + (f"; CUDA caches {how['cuda_cache']}" if run.device.startswith("cuda") else "")


def figures(run: RunResult, stem: Path) -> list[Path]:
    return []  # Table 6 is a table
