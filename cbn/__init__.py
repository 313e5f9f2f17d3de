"""Cross-Iteration Batch Normalization: the layer, model conversion and norm-layer factories."""

from cbn.convert import convert, find_conv_pairs, keep_statistics_per_rank
from cbn.layer import CrossIterationBatchNorm2d, check_finite
from cbn.norms import NORM_LAYERS, norm_layer, suggested_window

__all__ = [
    "CrossIterationBatchNorm2d",
    "NORM_LAYERS",
    "check_finite",
    "convert",
    "find_conv_pairs",
    "keep_statistics_per_rank",
    "norm_layer",
    "suggested_window",
]
