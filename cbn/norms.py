"""Norm layers by name, as ``norm_layer=`` callables for torchvision builders.

    >>> from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    >>> head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=norm_layer("gn"))

``NORM_LAYERS`` maps a name to a factory that takes the norm's options and returns the callable
(``num_features -> nn.Module``), or None for "no norm" (torchvision's heads then use conv bias).
CBN layers built this way must be bound to their convs: call ``cbn.convert(model)`` after building.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from cbn.layer import CrossIterationBatchNorm2d

NormLayer = Callable[[int], nn.Module]


def _group_norm(num_groups: int, num_features: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, num_features)


def _frozen_bn() -> NormLayer:
    from torchvision.ops.misc import FrozenBatchNorm2d  # the detection backbones' own frozen BN

    return FrozenBatchNorm2d


def _cbn(window: int = 4, burn_in: int = 0, grad_path: str = "efficient", negative_variance: str = "clamp") -> NormLayer:
    return partial(CrossIterationBatchNorm2d, window=window, burn_in=burn_in, grad_path=grad_path,
                   negative_variance=negative_variance)


def _naive_cbn(window: int = 4, burn_in: int = 0) -> NormLayer:
    return partial(CrossIterationBatchNorm2d, window=window, burn_in=burn_in, compensate=False)


NORM_LAYERS: dict[str, Callable[..., NormLayer | None]] = {
    "bn": lambda: nn.BatchNorm2d,
    "syncbn": lambda: nn.SyncBatchNorm,
    "gn": lambda num_groups=32: partial(_group_norm, num_groups),
    "frozenbn": _frozen_bn,
    "cbn": _cbn,
    "naive_cbn": _naive_cbn,
    "none": lambda: None,
}


def norm_layer(kind: str | NormLayer, **options) -> NormLayer | None:
    """The ``norm_layer=`` callable for ``kind`` (a name in NORM_LAYERS, or a callable passed through)."""
    if callable(kind):
        return partial(kind, **options) if options else kind
    if kind not in NORM_LAYERS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORM_LAYERS)} or pass a callable")
    factory = NORM_LAYERS[kind]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = ", ".join(inspect.signature(factory).parameters) or "no options"
        raise TypeError(f"norm {kind!r} takes {accepted}; got {', '.join(options)}") from None
    return factory(**options)


def suggested_window(images_per_device: int) -> int:
    """The paper's window size: k = min(ceil(16 / batch per device), 8)."""
    if images_per_device < 1:
        raise ValueError(f"images_per_device must be >= 1, got {images_per_device}")
    return min(-(-16 // images_per_device), 8)
