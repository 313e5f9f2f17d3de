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
from torchvision.models import resnet101, resnet50
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
    # Shifted copies of each ground-truth box added to the training proposals (0: plain torchvision);
    # see ProposalsAroundObjects.
    proposals_around_objects: int = 0

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
    if spec.proposals_around_objects:
        model.rpn = ProposalsAroundObjects(model.rpn, spec.proposals_around_objects)
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


class ProposalsAroundObjects(nn.Module):
    """The RPN, plus shifted copies of each ground-truth box among the training proposals.

    A trained RPN proposes many boxes around each object; a randomly initialized one proposes few,
    and how few depends on the norm under test (measured at 320 px: 17 positive RoIs per step with
    BN, 46 with GN). The RoI heads' work, and so every FLOP and time ratio between norms, would then
    measure that accident. With these boxes (IoU 0.79 to 0.89 with their object) the sampler's
    positive quota is always full, and every norm's heads do the same work.
    """

    SHIFTS = ((0.06, 0.0), (-0.06, 0.0), (0.0, 0.06), (0.0, -0.06), (0.06, 0.06), (-0.06, -0.06))

    def __init__(self, rpn: nn.Module, copies: int) -> None:
        super().__init__()
        if not 1 <= copies <= len(self.SHIFTS):
            raise ValueError(f"proposals_around_objects must be between 1 and {len(self.SHIFTS)}, got {copies}")
        self.rpn = rpn
        self.copies = copies

    def forward(self, images, features, targets=None):
        boxes, losses = self.rpn(images, features, targets)
        if self.training and targets is not None:
            boxes = [torch.cat([b, self._around(t["boxes"], size)])
                     for b, t, size in zip(boxes, targets, images.image_sizes)]
        return boxes, losses

    def _around(self, gt: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        shifted = [gt + wh * gt.new_tensor([dx, dy, dx, dy]) for dx, dy in self.SHIFTS[: self.copies]]
        return box_ops.clip_boxes_to_image(torch.cat(shifted), image_size).detach()
