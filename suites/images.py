"""Natural images for training runs that must see real image statistics: scikit-image's bundled
sample photographs (nothing is downloaded), randomly scaled, cropped and flipped, each image its own
class. The same seed and step always give the same batch."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# Shipped inside the scikit-image wheel (skimage/data), unlike the ones it fetches with pooch.
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
           "camera", "coins", "brick", "grass")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet's, as torchvision's models expect
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@functools.cache
def sample_images() -> tuple[Tensor, ...]:
    """Every sample as a normalized float (3, H, W) tensor (grey ones repeated to three channels)."""
    try:
        from skimage import data
    except ImportError as err:
        raise RuntimeError("the statistics suite trains on scikit-image's sample images: "
                           "pip install scikit-image (or pip install -e .)") from err
    images = []
    for name in SAMPLES:
        pixels = torch.from_numpy(getattr(data, name)().copy()).float() / 255.0
        image = pixels.expand(3, *pixels.shape) if pixels.dim() == 2 else pixels.permute(2, 0, 1)[:3]
        images.append(((image - _MEAN) / _STD).contiguous())
    return tuple(images)


def batch(step: int, size: int, image_px: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Training batch number step: size crops of image_px x image_px, each from a random sample
    image whose short side is scaled to between 1 and 2 image_px, flipped half the time (as
    RandomResizedCrop would, over a quarter to all of the short side); labels are the sample indices."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    bases = _bases(image_px)
    labels = torch.randint(len(bases), (size,), generator=gen)
    crops = [_crop(bases[int(label)], image_px, gen) for label in labels]
    return torch.stack(crops), labels


@functools.cache
def _bases(image_px: int) -> tuple[Tensor, ...]:
    """The samples with their short side at 2 image_px, so that each crop rescales a small image."""
    return tuple(_resize(image, 2 * image_px / min(image.shape[1:])) for image in sample_images())


def _resize(image: Tensor, factor: float) -> Tensor:
    size = [max(1, round(side * factor)) for side in image.shape[1:]]
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _crop(base: Tensor, image_px: int, gen: torch.Generator) -> Tensor:
    scaled = _resize(base, 0.5 + 0.5 * float(torch.rand((), generator=gen)))
    _, h, w = scaled.shape
    top = int(torch.randint(h - image_px + 1, (), generator=gen))
    left = int(torch.randint(w - image_px + 1, (), generator=gen))
    crop = scaled[:, top:top + image_px, left:left + image_px]
    return crop.flip(-1) if bool(torch.rand((), generator=gen) < 0.5) else crop
