"""Cross-Iteration Batch Normalization: the layer, model conversion and norm-layer factories."""

from cbn.clock import advance
from cbn.convert import convert, find_conv_pairs, keep_statistics_per_rank
from cbn.distributed import gather_per_rank_state, load_per_rank_state, per_rank_state
from cbn.layer import CrossIterationBatchNorm2d, check_finite, negative_variance_counts
from cbn.norms import NORM_LAYERS, norm_layer, suggested_window

__all__ = [
    "CrossIterationBatchNorm2d",
    "NORM_LAYERS",
    "advance",
    "check_finite",
    "convert",
    "find_conv_pairs",
    "gather_per_rank_state",
    "keep_statistics_per_rank",
    "load_per_rank_state",
    "negative_variance_counts",
    "norm_layer",
    "per_rank_state",
    "suggested_window",
]
