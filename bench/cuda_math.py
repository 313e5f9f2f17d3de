"""The CUDA math modes a run uses, applied in the runner and in every worker, and recorded.

cudnn.benchmark is off: detection inputs vary in size (image batches, RoI counts, detections at
inference), so real training would re-tune on every new shape and a benchmark that tunes once
would flatter it. TF32 is off for matmul and cuDNN: the paper measured fp32 on V100s, which have
no TF32, and TF32 changes the relative cost of the convolutions that CBN adds. Deterministic
algorithms are off, as in ordinary training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CudaMath:
    cudnn_benchmark: bool = False
    tf32_matmul: bool = False
    tf32_cudnn: bool = False
    deterministic: bool = False

    def apply(self) -> None:
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = self.tf32_matmul
        torch.backends.cudnn.allow_tf32 = self.tf32_cudnn
        torch.use_deterministic_algorithms(self.deterministic)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = CudaMath()
