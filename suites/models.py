"""Detection models built from torchvision components, with the norm under test where the paper puts it.

Paper placement ("heads"): frozen BN in the ResNet backbone, the norm under test in the FPN and in
the 4conv1fc box head and 4-conv mask head (torchvision's "v2" heads). "all" also puts it in
backbone stages 2-4 (layer2..layer4), the paper's second setting. Norm "none" builds the paper's
"-" baseline: frozen BN backbone, no norm in FPN and heads (their convs get a bias instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

import cbn

ARCHS = ("mask_rcnn", "faster_rcnn")
DEPTHS = {50: resnet50, 101: resnet101}
PLACEMENTS = ("heads", "all")
FPN_CHANNELS = 256


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that decides a detection model's structure."""

    arch: str = "mask_rcnn"
    depth: int = 50
    norm: str = "bn"  # a name in cbn.NORM_LAYERS
    norm_options: dict[str, Any] = field(default_factory=dict)
    placement: str = "heads"
    min_size_px: int = 800
    max_size_px: int = 1333
    num_classes: int = 91
    # torchvision's defaults; small test profiles lower them, since the RoI heads dominate small inputs.
    sampled_rois_per_image: int = 512
    proposals_per_image: int = 2000
    # 0.0 keeps box_detections_per_img detections at inference even with random weights, so the
    # mask head does its real inference work (0.05, torchvision's default, leaves it nothing).
    box_score_thresh: float = 0.05
    # The RPN's proposals replaced by a fixed set (FixedProposals), the same for every norm.
    fixed_proposals: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {self.depth!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "all" and self.norm == "none":
            raise ValueError("placement='all' needs a norm for backbone stages 2-4; norm 'none' only fits 'heads'")


def build_detector(spec: DetectorSpec) -> nn.Module:
    """A randomly initialized (weights=None) Faster/Mask R-CNN R50/R101-FPN with v2 heads."""
    make_norm = cbn.norm_layer(spec.norm, **spec.norm_options)
    backbone_norm = make_norm if spec.placement == "all" else FrozenBatchNorm2d
    resnet = DEPTHS[spec.depth](weights=None, norm_layer=backbone_norm)
    if spec.placement == "all":
        _freeze_stem_and_stage1_norms(resnet)
    # trainable_layers=3: stem and layer1 frozen, as torchvision's detection builders do.
    backbone = _resnet_fpn_extractor(resnet, trainable_layers=3, norm_layer=make_norm)
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    common = dict(
        num_classes=spec.num_classes,
        min_size=spec.min_size_px,
        max_size=spec.max_size_px,
        box_batch_size_per_image=spec.sampled_rois_per_image,
        box_score_thresh=spec.box_score_thresh,
        rpn_pre_nms_top_n_train=spec.proposals_per_image,
        rpn_post_nms_top_n_train=spec.proposals_per_image,
        rpn_pre_nms_top_n_test=min(spec.proposals_per_image, 1000),
        rpn_post_nms_top_n_test=min(spec.proposals_per_image, 1000),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(FPN_CHANNELS, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [256] * 4, [1024], norm_layer=make_norm),
    )
    if spec.arch == "faster_rcnn":
        model = FasterRCNN(backbone, **common)
    else:
        model = MaskRCNN(backbone, mask_head=MaskRCNNHeads(FPN_CHANNELS, [256] * 4, 1, norm_layer=make_norm), **common)
    if spec.fixed_proposals:
        model.rpn = FixedProposals(model.rpn)
    if spec.norm in ("cbn", "naive_cbn"):
        cbn.convert(model)  # binds each CBN layer to the conv that feeds it
    return model


def _freeze_stem_and_stage1_norms(resnet: nn.Module) -> None:
    """Stem and layer1 keep frozen BN in the paper's 'all' setting; only stages 2-4 get the norm."""
    for parent in [resnet, *resnet.layer1.modules()]:
        for name, child in list(parent.named_children()):
            if name != "layer1" and _is_trainable_norm(child):
                setattr(parent, name, FrozenBatchNorm2d(_num_channels(child)))


def _is_trainable_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, cbn.CrossIterationBatchNorm2d))


def _num_channels(norm: nn.Module) -> int:
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


class FixedProposals(nn.Module):
    """The RPN, with its proposals replaced by a fixed, seeded set that does not depend on the model.

    A randomly initialized RPN proposes what its weights, and so the norm under test, make it
    propose, and the RoI heads' work (sampled RoIs, positives for the mask head) would differ per
    norm: every FLOP and time ratio would measure that accident. Here the RPN still runs whole (its
    head, anchor decoding, top-k and NMS, and in training its losses), so its cost is measured, but
    the boxes it hands the RoI heads are fixed by ``fix()``: in training exactly as many positives
    and negatives as the sampler's quotas take (so it takes them all, whatever its random draw), at
    inference a fixed set of boxes of the test-time proposal count.
    """

    def __init__(self, rpn: nn.Module) -> None:
        super().__init__()
        self.rpn = rpn
        self.image_sizes: list[tuple[int, int]] | None = None
        self.training_boxes: list[torch.Tensor] = []
        self.inference_boxes: list[torch.Tensor] = []

    def fix(self, gt_boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]], sampled_per_image: int,
            positive_fraction: float, inference_per_image: int, seed: int = 0) -> None:
        """The proposals for a batch with these (transformed) ground-truth boxes and image sizes."""
        gen = torch.Generator().manual_seed(seed)
        self.image_sizes = [tuple(s) for s in image_sizes]
        self.training_boxes = [quota_filling_proposals(gt, size, sampled_per_image, positive_fraction, gen)
                               for gt, size in zip(gt_boxes, self.image_sizes)]
        self.inference_boxes = [random_boxes(inference_per_image, size, gen).to(gt.device)
                                for gt, size in zip(gt_boxes, self.image_sizes)]

    def forward(self, images, features, targets=None):
        _, losses = self.rpn(images, features, targets)
        if self.image_sizes is None:
            raise RuntimeError("FixedProposals: call fix() with the batch's boxes before the first forward")
        if [tuple(s) for s in images.image_sizes] != self.image_sizes:
            raise ValueError(f"FixedProposals: fixed for images of sizes {self.image_sizes}, "
                             f"got {list(images.image_sizes)}; call fix() for this batch")
        return list(self.training_boxes if self.training else self.inference_boxes), losses


def quota_filling_proposals(gt: torch.Tensor, image_size: tuple[int, int], sampled: int, positive_fraction: float,
                            gen: torch.Generator) -> torch.Tensor:
    """Proposals that, with the ground truths torchvision adds to them, fill the RoI sampler's
    quotas exactly: int(sampled * positive_fraction) positives (IoU >= 0.5 with an object) and the
    rest negatives (IoU < 0.5 with every object)."""
    positives = int(sampled * positive_fraction)
    shifted_needed = positives - len(gt)
    if shifted_needed < 0:
        raise ValueError(f"{sampled} sampled RoIs per image leave {positives} positives, fewer than the {len(gt)} "
                         "ground-truth boxes torchvision adds as proposals; raise sampled_rois_per_image")
    cpu_gt = gt.detach().float().cpu()
    wh = (cpu_gt[:, 2:] - cpu_gt[:, :2]).repeat(1, 2)
    which = torch.arange(shifted_needed) % len(gt)
    jitter = (torch.rand(shifted_needed, 4, generator=gen) - 0.5) * 0.1  # up to 5% of the box's side
    shifted = box_ops.clip_boxes_to_image(cpu_gt[which] + wh[which] * jitter, image_size)
    pool = random_boxes(40 * (sampled - positives) + 100, image_size, gen, largest=0.3)
    negatives = pool[box_ops.box_iou(pool, cpu_gt).max(dim=1).values < 0.3][: sampled - positives]
    if len(negatives) < sampled - positives:
        raise ValueError(f"found only {len(negatives)} of {sampled - positives} background proposals away from "
                         f"{len(gt)} objects in an image of {image_size}; use fewer objects or larger images")
    if len(shifted) and box_ops.box_iou(shifted, cpu_gt).max(dim=1).values.min() < 0.5:
        raise AssertionError("a shifted ground-truth box fell below IoU 0.5 with its object")
    return torch.cat([shifted, negatives]).to(gt.device)


def random_boxes(count: int, image_size: tuple[int, int], gen: torch.Generator, smallest: float = 0.02,
                 largest: float = 0.5) -> torch.Tensor:
    """count boxes inside an image of (height, width), each side a uniform share of the image's."""
    height, width = image_size
    side = torch.tensor([width, height], dtype=torch.float32)
    size = (torch.rand(count, 2, generator=gen) * (largest - smallest) + smallest) * side
    corner = torch.rand(count, 2, generator=gen) * (side - size)
    return torch.cat([corner, corner + size], dim=1)
