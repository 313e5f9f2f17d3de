"""Table 6 of the CBN paper, reproduced and extended: memory, FLOPs, training and inference speed of
each norm in a detection model, with ratios to BN and the paper's ratios beside them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import counts, flops, modes, ranks
from bench.metrics import count
from bench.results import CaseResult, Derived, RunResult
from bench.suite import Case, Measurement, Table, resolve_options, stored_profile
from suites import ratios
from suites.constants import STEP_TIME_OVER_FLOPS, STEP_TIME_OVER_FLOPS_TARGET, WINDOW
from suites.data import synthetic_batch
from suites.models import DetectorSpec, ProposalsAroundObjects, build_detector
from suites.workload import NoInputForward, TrainingWorkload, mode_caption, processes_caption, processes_label

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
OPTIONS = {"arch": ("mask_rcnn", "faster_rcnn"), "depth": ("50", "101"), "placement": ("heads", "all"), **modes.OPTIONS}
BASE_LR = 0.02
SYNCBN_ON_CPU = ("not measured: torch's SyncBatchNorm synchronizes CUDA (or XPU) tensors only and refuses CPU ones; "
                 "BN, GN and CBN run across the processes")
COUNTS = {"train_step_flops": "flop", "forward_macs": "mac", "inference_forward_macs": "mac"}  # device-independent


def default_profile(device: str) -> str:
    return "paper" if device == "cuda" else "cpu"


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    options = resolve_options(NAME, OPTIONS, options)
    modes.Mode.of(options).check(device)
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


# ---------------------------------------------------------------------- the workload (in the worker)
class DetectionWorkload(TrainingWorkload):
    inference_warmup_calls = 2

    def __init__(self, params: dict, device: str) -> None:
        self.profile = profile_of(params)
        self.known_counts: dict | None = None
        self.steps_done = 0
        self.device = torch.device(device)
        self.skipped = SYNCBN_ON_CPU if params["norm"] == "syncbn" and ranks.world_size() > 1 and device == "cpu" else None
        if self.skipped:
            return
        p = self.profile
        spec = DetectorSpec(
            arch=params["arch"], depth=int(params["depth"]), norm=params["norm"], norm_options=params["norm_options"],
            placement=params["placement"], min_size_px=min(p.height_px, p.width_px), max_size_px=max(p.height_px, p.width_px),
            sampled_rois_per_image=p.sampled_rois_per_image, proposals_per_image=p.proposals_per_image, box_score_thresh=0.0,
            proposals_around_objects=len(ProposalsAroundObjects.SHIFTS),
        )
        torch.manual_seed(0)
        self.model = build_detector(spec).to(self.device)
        self.images, self.targets = synthetic_batch(p.images_per_device, p.height_px, p.width_px, seed=ranks.rank(),
                                                    device=self.device)  # each rank its own images
        self.distribute()
        trainable = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=BASE_LR, momentum=0.9, weight_decay=1e-4)
        self.mode = modes.Mode.of(params)
        self.enter_mode()
        # Detectron's linear warm-up (factor 0.001 over 1000 iterations): the benchmark's few dozen
        # steps stay in it, so random-weight training does not diverge.
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=0.001, total_iters=1000)

    def loss(self) -> torch.Tensor:
        self.model.train()
        return sum(self.trained()(self.images, self.targets).values())

    def after_optimizer_step(self) -> None:
        self.scheduler.step()

    def compile_targets(self) -> list[nn.Module]:
        # The conv stacks: torchvision's detection models do not compile whole (the RPN's and the
        # RoI heads' sampling and box decoding are data-dependent).
        heads = self.model.roi_heads
        return [m for m in (self.model.backbone, heads.box_head, getattr(heads, "mask_head", None)) if m is not None]

    def reuse_counts(self, entry: dict) -> None:
        self.known_counts = entry

    def measure(self) -> Measurement:
        if self.skipped:
            return Measurement({}, [self.skipped], status="skipped")
        for _ in range(WINDOW + 1):  # CBN's window is full from here on
            self.train_step()
        notes: list[str] = []
        if self.known_counts is not None:
            found = {name: self.known_counts["metrics"][name] for name in COUNTS}
            notes.append(counts.note(self.known_counts))
            torch.manual_seed(1)
            memory_metrics = self.memory(notes)
        else:
            found = {}
            torch.manual_seed(1)  # RoI sampling draws random numbers: fixed, so counts repeat exactly
            found["train_step_flops"] = flops.counted_flops(self.train_step)
            torch.manual_seed(1)
            with self.locally():
                found["forward_macs"], skipped = flops.fvcore_forward_flops(NoInputForward(self.model, self.loss), ())
            self.train_step()  # ends the traced iteration with an optimizer step
            torch.manual_seed(1)
            memory_metrics = self.memory(notes)
            self.model.eval()
            found["inference_forward_macs"], _ = flops.fvcore_forward_flops(_InferenceForward(self), ())
            if skipped:
                notes.append("fvcore skipped (no FLOPs counted): " + ", ".join(sorted(skipped)))
        metrics = {name: count(value, COUNTS[name]) for name, value in found.items()}
        return Measurement({**metrics, **memory_metrics, **self.structure()}, notes)


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
def derive(case_results: list[CaseResult]) -> list[Derived]:
    by_name = {c.case: c for c in case_results if c.status == "ok"}
    bn = by_name.get("bn")
    if bn is None:
        return []
    out = [d for name, case in by_name.items() if name != "bn" for d in ratios.to_bn(NAME, "", name, case, bn)]
    if "cbn" in by_name:
        out.append(ratios.step_time_over_flops(NAME, "", by_name["cbn"], bn))
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
    mode = modes.Mode.of(params)
    title = (f"Table 6, profile {run.profile}: {arch} R{params['depth']}-FPN, norm in {_placement(params['placement'])}, "
             f"{p.images_per_device} x {p.width_px}x{p.height_px} images, {p.sampled_rois_per_image} RoIs/image, "
             f"{mode.label}, on {run.environment.device_name}{processes_label(params)}")
    columns = ["norm", *ratios.COLUMNS, "paper xBN mem/FLOPs/train/infer"]
    return [Table(title, columns, rows, _caption(run, derived))]


def _placement(placement: str) -> str:
    return "FPN and heads, frozen BN backbone" if placement == "heads" else "FPN, heads and backbone stages 2-4"


def _row(case: CaseResult, derived: dict[str, Derived]) -> list[str]:
    label = NORMS[case.case][2]
    if case.status != "ok":
        return [label, *ratios.failed_cells(case), ""]
    paper = PAPER_RATIOS.get(case.case)
    return [label, *ratios.cells(case, case.case, "", derived), "-" if paper is None else " / ".join(f"{v:.3g}" for v in paper)]


def _caption(run: RunResult, derived: dict[str, Derived]) -> list[str]:
    cuda = run.device == "cuda"
    cases_here = run.cases_of(NAME)
    lines = [
        "memory: " + ("torch.cuda.max_memory_allocated over one training step (NVML figures in the JSON)" if cuda else
                      "counted bytes a training step holds: parameters, gradients, SGD momentum, tensors saved for "
                      "backward, CBN history (peak RSS in the JSON)"),
        "fwd GMAC: fvcore, training-mode forward incl. CBN's cbn::conv_weight_grad, 1 multiply-add = 1 flop; "
        "train-step GFLOP: torch FlopCounterMode, forward + backward, 2 flops per multiply-add",
        f"iter/s: 1 / median of {ratios.samples(cases_here)} samples from interleaved rounds "
        f"({ratios.sampling_text(cases_here, run.device)}); "
        "ratios to BN with bootstrap 95% intervals; the paper's ratios are from its Table 6 (V100, 1333x800, 4 img/GPU)",
        "GN: 32 groups; CBN: efficient statistic-gradient path; -: frozen BN backbone and no norm in FPN and heads",
        _syncbn_caption(cases_here[0].params, run.device),
        *processes_caption(cases_here[0].params),
        *mode_caption(modes.Mode.of(cases_here[0].params), "the conv stacks (backbone with FPN, box head, mask head); "
                      "the RPN and the RoI heads' sampling run eagerly"),
    ]
    check = derived.get(STEP_TIME_OVER_FLOPS)
    if check is not None:
        lines.append(ratios.verdict(check, STEP_TIME_OVER_FLOPS_TARGET["cpu" if run.device == "cpu" else "cuda"],
                                    run.device))
    return lines


def _syncbn_caption(params: dict, device: str) -> str:
    world = params.get("world_size", 1)
    if world == 1:
        return "SyncBN*: one process, where SyncBN is plain BN: no synchronization is measured"
    if device == "cpu":
        return f"SyncBN*: {SYNCBN_ON_CPU}"
    return f"SyncBN*: statistics synchronized across the {world} processes through {params['backend']}"


def figures(run: RunResult, stem: Path) -> list[Path]:
    return []  # Table 6 is a table

