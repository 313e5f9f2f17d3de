"""Table 6 of the CBN paper, reproduced and extended: memory, FLOPs, training and inference speed of
each norm in a detection model, with ratios to BN and the paper's ratios beside them.

Every norm does the same work, by construction and checked. The RPN runs whole, but the boxes it
hands the RoI heads are a fixed, seeded set (suites/models.py, FixedProposals): in training exactly
the sampler's quotas of positives and negatives, at inference a fixed set of proposals for the box
head and a fixed set of detections (boxes and labels) for the mask head. Timed inference is the
network's forward as the paper times it: transform, backbone with FPN, the RPN (its head, decoding,
top-k and NMS, which do depend on its scores), box head and predictor, mask head and predictor;
post-processing (box decoding, per-class NMS, mask pasting) is not timed. Each case records digests
of the boxes its heads pooled in one training step and one inference call (``work``), and the runner
fails the cases whose digests differ from the first case's.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.roi_heads import maskrcnn_inference

from bench import counts, ranks, training_modes
from bench.metrics import Collected, count
from bench.results import CaseResult, Derived, FigureId, RunResult
from bench.suite import Case, Measurement, Processes, Table, resolve_options, settings_of
from suites import ratios
from suites.constants import CONTROL, STEP_TIME_OVER_FLOPS_TARGET, WINDOW
from suites.constants import default_profile as default_profile  # the Suite contract's, shared
from suites.data import synthetic_batch
from suites.models import DetectorSpec, build_detector
from suites.workload import TrainingWorkload, mode_caption, processes_caption

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
    norms: tuple[str, ...] = ("bn", "gn", "syncbn", "cbn", "naive_cbn", "none", CONTROL)  # keys of NORMS
    kept_per_round: int = 1  # training and inference samples kept per round (bench/sampling.py)


PROFILES = {
    # 7 norms x 10 rounds x 2 blocks of (1 discarded + 2 kept) calls: planned by tools/gpu_run.py to
    # fit its first command (at most 5 minutes) on one H200; 10 rounds for a t-interval of 9 degrees
    # of freedom.
    "paper": Profile(800, 1333, 4, 512, 2000, warmup_steps=5, rounds=10, timeout_s=420, kept_per_round=2),
    "cpu": Profile(320, 320, 2, 128, 300, warmup_steps=1, rounds=7, timeout_s=900),
    # What the CI gate runs: CBN, whose ratios it guards, against BN and the A/A control, at a size
    # that takes about 4 minutes on 2 cores (GN's ratios are guarded in classify's quick profile).
    "quick": Profile(256, 256, 1, 64, 200, warmup_steps=1, rounds=7, timeout_s=600, norms=("bn", "cbn", CONTROL)),
    # 32 RoIs per image: a positive quota of 8 holds the 7 objects torchvision adds as proposals.
    "smoke": Profile(96, 96, 1, 32, 50, warmup_steps=1, rounds=2, timeout_s=300),
}


# case name -> (norm, options, label); the paper's ratios to BN: memory, FLOPs, train, inference
NORMS = {
    "bn": ("bn", {}, "BN"),
    "gn": ("gn", {}, "GN"),
    "syncbn": ("syncbn", {}, "SyncBN*"),
    "cbn": ("cbn", {"window": WINDOW}, f"CBN k={WINDOW}"),
    "naive_cbn": ("naive_cbn", {"window": WINDOW}, f"Naive CBN k={WINDOW}"),
    "none": ("none", {}, "- (no norm)"),
    CONTROL: ("bn", {}, "BN (A/A control)"),  # BN again: its ratios to BN are the run's noise
}
PAPER_RATIOS = {"gn": (1.00, 1.023, 0.92, 0.60), "cbn": (1.07, 1.127, 0.77, 1.00)}
OPTIONS = {"arch": ("mask_rcnn", "faster_rcnn"), "depth": ("50", "101"), "placement": ("heads", "all"), **training_modes.OPTIONS}
BASE_LR = 0.02
SYNCBN_ON_CPU = ("not measured: torch's SyncBatchNorm synchronizes CUDA (or XPU) tensors only and refuses CPU ones; "
                 "BN, GN and CBN run across the processes")
COUNTS = {"train_step_flops": "flop", "forward_macs": "mac", "inference_forward_macs": "mac"}  # device-independent
POSITIVE_FRACTION = 0.25  # torchvision's box_positive_fraction: the sampler's positive quota


def profiled_cases(norms: list[str], profile: str | None, device: str,
                   options: dict[str, str]) -> tuple[list[Case], str]:
    """One case per norm for `python -m bench profile`, at profile (default: the device's)."""
    profile = profile or default_profile(device)
    if profile not in PROFILES:
        raise ValueError(f"table6 has no profile {profile!r}; it has: {', '.join(PROFILES)}")
    by_name = {c.name: c for c in cases(profile, device, options)}
    unknown = [n for n in norms if n not in by_name]
    if unknown:
        raise ValueError(f"table6 at profile {profile} has no norm {unknown[0]!r}; it has {', '.join(by_name)}")
    return [by_name[n] for n in norms], profile


@dataclass(frozen=True)
class Settings:
    """One case: the profile, the norm (cbn.norm_layer's name and options) and the detector."""

    profile: Profile
    norm: str
    norm_options: dict[str, int]
    arch: str  # "mask_rcnn" or "faster_rcnn"
    depth: int  # ResNet depth of the backbone
    placement: str  # "heads" or "all" (_placement)
    window: int = WINDOW  # CBN's k


SETTINGS = Settings


def cases(profile: str, device: str, options: dict[str, str] | None = None) -> list[Case]:
    options = resolve_options(NAME, OPTIONS, options)
    mode = training_modes.Mode.from_options(options).check(device)
    p = PROFILES[profile]
    out = []
    for name in p.norms:
        norm, norm_options, _ = NORMS[name]
        if norm == "none" and options["placement"] == "all":
            continue  # "no norm" has no backbone variant
        settings = Settings(p, norm, norm_options, options["arch"], int(options["depth"]), options["placement"])
        out.append(Case(NAME, name, settings, mode, group=NAME, rounds=p.rounds, timeout_s=p.timeout_s,
                        kept_per_round=p.kept_per_round))
    return out


# ---------------------------------------------------------------------- the workload (in the worker)
class DetectionWorkload(TrainingWorkload):
    inference_warmup_calls = 2

    def __init__(self, case: Case, device: str) -> None:
        s: Settings = case.settings
        self.profile = s.profile
        self.known_counts: dict | None = None
        self.steps_done = 0
        self.device = torch.device(device)
        self.skipped = SYNCBN_ON_CPU if s.norm == "syncbn" and ranks.world_size() > 1 and device == "cpu" else None
        if self.skipped:
            return
        p = self.profile
        spec = DetectorSpec(
            arch=s.arch, depth=s.depth, norm=s.norm, norm_options=s.norm_options,
            placement=s.placement, min_size_px=min(p.height_px, p.width_px), max_size_px=max(p.height_px, p.width_px),
            sampled_rois_per_image=p.sampled_rois_per_image, proposals_per_image=p.proposals_per_image,
            fixed_proposals=True,
        )
        torch.manual_seed(0)
        self.model = build_detector(spec).to(self.device)
        self.images, self.targets = synthetic_batch(p.images_per_device, p.height_px, p.width_px, seed=ranks.rank(),
                                                    device=self.device)  # each rank its own images
        self.fix_heads_work(spec)
        self.distribute()
        trainable = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=BASE_LR, momentum=0.9, weight_decay=1e-4)
        self.mode = case.mode or training_modes.Mode()
        self.enter_mode()
        # Detectron's linear warm-up (factor 0.001 over 1000 iterations): the benchmark's few dozen
        # steps stay in it, so random-weight training does not diverge.
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=0.001, total_iters=1000)

    def fix_heads_work(self, spec: DetectorSpec) -> None:
        """The boxes every norm's RoI heads will pool: proposals filling the sampler's quotas in
        training, a fixed set at inference, and fixed detections for the inference mask head, all
        in the coordinates of the model's transform (seeded, independent of the model's weights)."""
        with torch.no_grad():
            image_list, transformed = self.model.transform(self.images, self.targets)
        sizes = [tuple(s) for s in image_list.image_sizes]
        heads = self.model.roi_heads
        test_proposals = self.model.rpn.rpn._post_nms_top_n["testing"]  # what torchvision's RPN keeps at inference
        self.model.rpn.fix([t["boxes"] for t in transformed], sizes, spec.sampled_rois_per_image, POSITIVE_FRACTION,
                           test_proposals, seed=1)
        gen = torch.Generator().manual_seed(2)
        self.detections = [b[: heads.detections_per_img] for b in self.model.rpn.inference_boxes]
        self.detection_labels = [torch.randint(1, spec.num_classes, (len(b),), generator=gen).to(self.device)
                                 for b in self.detections]

    def loss(self) -> torch.Tensor:
        self.model.train()
        return sum(self.trained()(self.images, self.targets).values())

    def inference(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.mode.autocast(self.device):
            self.network_forward()

    def network_forward(self) -> list[torch.Tensor]:
        """The paper's inference, post-processing left out: GeneralizedRCNN.forward up to the box
        and mask predictors, the mask head on the fixed detections (what RoIHeads does in eval mode
        after its postprocess_detections)."""
        m = self.model
        images, _ = m.transform(self.images)
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        heads = m.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
        out = list(heads.box_predictor(box_features))
        if heads.has_mask():
            mask_features = heads.mask_head(heads.mask_roi_pool(features, self.detections, images.image_sizes))
            out += maskrcnn_inference(heads.mask_predictor(mask_features), self.detection_labels)
        return out

    def heads_work(self) -> dict[str, str]:
        """Digests of the boxes the RoI heads pooled in one training step and one inference call."""
        work = {}
        with pooled_boxes(self.model.roi_heads) as seen:
            self.train_step()
        work.update({f"train {name} RoIs": digest(boxes) for name, boxes in seen.items()})
        with pooled_boxes(self.model.roi_heads) as seen:
            self.inference()
        work.update({f"inference {name} RoIs": digest(boxes) for name, boxes in seen.items()})
        return work

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
        """Work digests, FLOPs, memory and structure, each metric on its own: one that fails is
        recorded as missing with its error, and the case keeps the rest and is still timed."""
        if self.skipped:
            return Measurement({}, [self.skipped], status="skipped")
        for _ in range(WINDOW + 1):  # CBN's window is full from here on
            self.train_step()
        notes: list[str] = []
        work = self.heads_work()
        found = Collected()
        if self.known_counts is not None:
            found.metrics.update({name: count(self.known_counts["metrics"][name], unit) for name, unit in COUNTS.items()})
            notes.append(counts.note(self.known_counts))
        else:
            self.count_training(found, notes)
        found.attempt(("memory",), lambda: self.memory(notes))
        if self.known_counts is None:
            self.count_inference(found, self.network_forward)
        return Measurement({**found.metrics, **self.structure()}, notes, missing=found.missing, work=work)


@contextlib.contextmanager
def pooled_boxes(roi_heads: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The boxes given to the box and mask RoI pools while the block runs: "box"/"mask" -> per image."""
    seen: dict[str, list[torch.Tensor]] = {}
    pools = {"box": roi_heads.box_roi_pool, "mask": getattr(roi_heads, "mask_roi_pool", None)}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:  # returns None: the pool's arguments stay as given
            seen.setdefault(name, list(args[1]))
        return record

    handles = [pool.register_forward_pre_hook(hook(name)) for name, pool in pools.items() if pool is not None]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def digest(tensors: list[torch.Tensor]) -> str:
    """A short digest of the tensors' shapes and exact values."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().float().cpu().contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def build(case: Case, device: str) -> DetectionWorkload:
    return DetectionWorkload(case, device)


# ---------------------------------------------------------------------- reporting (in the runner)
def derive(case_results: list[CaseResult]) -> list[Derived]:
    by_name = {c.case: c for c in case_results if c.status == "ok"}
    bn = by_name.get("bn")
    if bn is None:
        return []
    out = [d for name, case in by_name.items() if name != "bn" for d in ratios.to_bn(NAME, case, bn)]
    if CONTROL in by_name:
        out += ratios.control_checks(NAME, by_name[CONTROL], bn)
    if "cbn" in by_name:
        out += ratios.step_time_over_flops(NAME, by_name["cbn"], bn)
    return out


def tables(run: RunResult) -> list[Table]:
    cases_here = run.cases_of(NAME)
    if not cases_here:
        return []
    derived = run.derived_of(NAME)
    first = cases_here[0]
    s = settings_of(Settings, first)
    p = s.profile
    rows = [_row(c, derived) for c in cases_here]
    arch = "Mask R-CNN" if s.arch == "mask_rcnn" else "Faster R-CNN"
    mode = first.mode or training_modes.Mode()
    title = (f"Table 6, profile {run.profile}: {arch} R{s.depth}-FPN, norm in {_placement(s.placement)}, "
             f"{p.images_per_device} x {p.width_px}x{p.height_px} images, {p.sampled_rois_per_image} RoIs/image, "
             f"{mode.label}, on {run.environment.device_name}{first.processes.label}")
    columns = ["norm", *ratios.COLUMNS, "paper xBN mem/FLOPs/train/infer"]
    return [Table(title, columns, rows, _caption(run, derived))]


def _placement(placement: str) -> str:
    return "FPN and heads, frozen BN backbone" if placement == "heads" else "FPN, heads and backbone stages 2-4"


def _row(case: CaseResult, derived: dict[FigureId, Derived]) -> list[str]:
    label = NORMS[case.case][2]
    if case.status != "ok":
        return [label, *ratios.failed_cells(case), ""]
    paper = PAPER_RATIOS.get(case.case)
    return [label, *ratios.cells(case, derived), "-" if paper is None else " / ".join(f"{v:.3g}" for v in paper)]


def _caption(run: RunResult, derived: dict[FigureId, Derived]) -> list[str]:
    cuda = run.device == "cuda"
    cases_here = run.cases_of(NAME)
    lines = [
        "memory: " + ("torch.cuda.max_memory_allocated over one training step (NVML figures in the JSON)" if cuda else
                      "counted bytes a training step holds: parameters, gradients, SGD momentum, tensors saved for "
                      "backward, CBN history (peak RSS in the JSON)"),
        "fwd GMAC: fvcore, training-mode forward incl. CBN's cbn::conv_weight_grad, 1 multiply-add = 1 flop; "
        "train-step GFLOP: torch FlopCounterMode, forward + backward, 2 flops per multiply-add",
        f"iter/s: 1 / median of {ratios.samples(cases_here)} samples from {ratios.rounds(cases_here)} interleaved rounds "
        f"({ratios.sampling_text(cases_here, run.device)}); ratios to BN paired by round (geometric mean of the "
        "rounds' ratios, 95% t-interval); the paper's ratios are from its Table 6 (V100, 1333x800, 4 img/GPU)",
        "same work for every norm: the RoI heads pool fixed, seeded boxes (training: proposals filling the sampler's "
        "quotas; inference: fixed proposals and detections), " + _work_text(cases_here),
        "inference: the network's forward (transform, backbone+FPN, RPN with its top-k and NMS, box and mask heads "
        "on fixed boxes) in a block of consecutive calls on frozen weights; post-processing (box decoding, per-class "
        "NMS, mask pasting) not timed",
        "GN: 32 groups; CBN: efficient statistic-gradient path; -: frozen BN backbone and no norm in FPN and heads",
        _syncbn_caption(cases_here[0].processes, run.device),
        *processes_caption(cases_here[0].processes),
        *mode_caption(cases_here[0].mode or training_modes.Mode(), "the conv stacks (backbone with FPN, box head, mask head); "
                      "the RPN and the RoI heads' sampling run eagerly"),
    ]
    lines += ratios.control_caption(NAME, "", derived, run.device)
    lines += ratios.census_lines(cases_here, lambda c: NORMS[c.case][2])
    lines += ratios.missing_lines(cases_here, lambda c: NORMS[c.case][2])
    check = derived.get(ratios.step_time_over_flops_id(NAME, "cbn"))
    if check is not None:
        lines.append(ratios.verdict(check, STEP_TIME_OVER_FLOPS_TARGET["cpu" if run.device == "cpu" else "cuda"],
                                    run.device))
    return lines


def _work_text(cases: list[CaseResult]) -> str:
    digests = {tuple(sorted(c.work.items())) for c in cases if c.status == "ok" and c.work}
    if not digests:
        return "not recorded in this file"
    if len(digests) == 1:
        return "digests of the pooled boxes equal for every case: " + ", ".join(f"{k} {v}" for k, v in next(iter(digests)))
    return "digests of the pooled boxes DIFFER between cases (see each case's work in the JSON)"


def _syncbn_caption(processes: Processes, device: str) -> str:
    if processes.world_size == 1:
        return "SyncBN*: one process, where SyncBN is plain BN: no synchronization is measured"
    if device == "cpu":
        return f"SyncBN*: {SYNCBN_ON_CPU}"
    return f"SyncBN*: statistics synchronized across the {processes.world_size} processes through {processes.backend}"


def figures(run: RunResult, stem: Path) -> list[Path]:
    return []  # Table 6 is a table

