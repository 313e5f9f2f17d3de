"""Replace a model's BatchNorm2d layers by CBN, each bound to the conv that produces its input.

Pairing is structural, which covers torchvision's ResNet (conv1/bn1 .. conv3/bn3, downsample),
FPN and detection heads (Conv2dNormActivation, Sequential stacks):

* a norm that directly follows an nn.Conv2d in an nn.Sequential (or a subclass) is paired with it;
* a norm named ``bn<suffix>`` or ``norm<suffix>`` is paired with its sibling ``conv<suffix>``.

A pairing is also checked at run time: a CBN layer refuses to record a step whose input is not
the output of its bound conv, so a wrong guess fails loudly instead of compensating with the
wrong weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from cbn.distributed import keep_statistics_per_rank
from cbn.layer import CrossIterationBatchNorm2d

CONVERTIBLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_NAMED_NORM = re.compile(r"(?:bn|norm)(.*)")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (*CONVERTIBLE_NORMS, CrossIterationBatchNorm2d))


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def find_conv_pairs(model: nn.Module) -> dict[str, str]:
    """Map each norm layer's qualified name to the qualified name of the conv that feeds it."""
    pairs: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and _is_norm(norm):
                    pairs[_join(parent_name, norm_name)] = _join(parent_name, conv_name)
        siblings = dict(children)
        for norm_name, norm in children:
            match = _NAMED_NORM.fullmatch(norm_name)
            if match and _is_norm(norm) and isinstance(siblings.get("conv" + match.group(1)), nn.Conv2d):
                pairs[_join(parent_name, norm_name)] = _join(parent_name, "conv" + match.group(1))
    return pairs


def convert(
    model: nn.Module,
    *,
    window: int = 4,
    burn_in: int = 0,
    grad_path: str = "efficient",
    compensate: bool = True,
    negative_variance: str = "clamp",
    unpaired: str = "error",
    include: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Convert BatchNorm2d/SyncBatchNorm layers to CrossIterationBatchNorm2d and bind every CBN layer.

    Weights, biases and running statistics are carried over. CBN layers already in the model (e.g.
    built with ``cbn.norm_layer("cbn")``) keep their options and are bound to their convs.
    ``include(name, module)`` limits which norms are converted. A norm that needs a conv (any CBN
    with compensation) but cannot be paired is an error listing every such name, raised before the
    model is touched; ``unpaired="keep"`` leaves those layers as they are instead. Returns the model
    (or the new layer, when ``model`` itself is a norm), like ``SyncBatchNorm.convert_sync_batchnorm``.
    """
    if unpaired not in ("error", "keep"):
        raise ValueError(f"cbn.convert: unpaired must be 'error' or 'keep', got {unpaired!r}")
    modules = dict(model.named_modules())
    pairs = find_conv_pairs(model)
    targets = [n for n, m in modules.items() if _is_norm(m) and (include is None or include(n, m))]
    if not targets:
        raise ValueError(_nothing_to_convert(model, modules, include is not None))

    def needs_conv(module: nn.Module) -> bool:
        return module.compensate if isinstance(module, CrossIterationBatchNorm2d) else compensate

    lonely = [n for n in targets if n not in pairs and needs_conv(modules[n])]
    if lonely and unpaired == "error":
        raise ValueError(
            "cbn.convert: cannot tell which conv feeds these norm layers: "
            + ", ".join(lonely)
            + ". CBN compensates with the weight of the nn.Conv2d that directly produces a norm's input. "
            "Pass unpaired='keep' to leave them unconverted, include=... to skip them, or compensate=False."
        )
    options = dict(window=window, burn_in=burn_in, grad_path=grad_path, compensate=compensate,
                   negative_variance=negative_variance)
    for name in targets:
        if name in lonely:
            continue
        layer = modules[name]
        if not isinstance(layer, CrossIterationBatchNorm2d):
            layer = _from_batchnorm(layer, **options)
            if name == "":
                model = layer
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(modules[parent_name], child, layer)
        layer.name = name or None
        if name in pairs:
            layer.bind(modules[pairs[name]], name=name or None, conv_name=pairs[name])
    return keep_statistics_per_rank(model)


def _nothing_to_convert(model: nn.Module, modules: dict[str, nn.Module], filtered: bool) -> str:
    """Why convert found no layer, and what to do instead."""
    what = type(model).__name__
    if filtered and any(_is_norm(m) for m in modules.values()):
        return f"cbn.convert: include=... matched none of the norm layers of {what}; nothing was converted"
    frozen = [n for n, m in modules.items() if type(m).__name__ == "FrozenBatchNorm2d"]
    hint = (f" It has FrozenBatchNorm2d layers ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), "
            "fixed affine maps that CBN does not replace: build the model with norm_layer=nn.BatchNorm2d "
            "or cbn.norm_layer('cbn').") if frozen else " Build it with norm_layer=cbn.norm_layer('cbn') or nn.BatchNorm2d."
    return f"cbn.convert: {what} has no BatchNorm2d, SyncBatchNorm or CBN layer, so there is nothing to convert.{hint}"


def _from_batchnorm(bn: nn.modules.batchnorm._BatchNorm, **options) -> CrossIterationBatchNorm2d:
    layer = CrossIterationBatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        device=bn.running_mean.device if bn.running_mean is not None else None,
        dtype=bn.running_mean.dtype if bn.running_mean is not None else None,
        **options,
    )
    with torch.no_grad():
        if bn.affine:
            for mine, theirs in ((layer.weight, bn.weight), (layer.bias, bn.bias)):
                assert mine is not None and theirs is not None  # affine: both layers have them
                mine.copy_(theirs)
                mine.requires_grad_(theirs.requires_grad)
        if bn.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(layer, name).copy_(getattr(bn, name))
    layer.train(bn.training)
    return layer
