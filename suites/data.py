"""Seeded synthetic COCO-like batches: images, boxes, labels and instance masks."""

from __future__ import annotations

import torch
from torch import Tensor


def synthetic_batch(
    batch_size: int,
    height_px: int,
    width_px: int,
    *,
    boxes_per_image: int = 7,
    num_classes: int = 91,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The same seed always gives the same batch (generated on CPU, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, height_px, width_px, generator=gen))
        targets.append(_targets(height_px, width_px, boxes_per_image, num_classes, gen))
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def _targets(height: int, width: int, count: int, num_classes: int, gen: torch.Generator) -> dict[str, Tensor]:
    # Boxes between 1/8 and 1/2 of the image side, fully inside the image.
    size = torch.rand(count, 2, generator=gen) * 0.375 + 0.125
    size = size * torch.tensor([width, height])
    corner = torch.rand(count, 2, generator=gen) * (torch.tensor([width, height]) - size)
    boxes = torch.cat([corner, corner + size], dim=1).floor()
    labels = torch.randint(1, num_classes, (count,), generator=gen)
    masks = torch.zeros(count, height, width, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[i, y0:y1, x0:x1] = 1  # box-shaped instance masks
    return {"boxes": boxes, "labels": labels, "masks": masks}
