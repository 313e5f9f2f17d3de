"""How timing samples are taken: samples per round, warm-up discards, round order, CUDA cache policy.

The runner asks each worker for a round: ``timed_round(kept, discarded)``, in which the workload
times ``discarded + kept`` consecutive calls of each kind of step and keeps the last ``kept``
(``keep_last``). On CUDA the first call after another
case's worker ran pays for a cold L2, clocks and (when caches are emptied) cudaMalloc, so it is
discarded; the kept calls are steady-state training steps. The order of the cases rotates from
round to round so that no case always runs first after a pause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")

CONTEXT_BYTES = 1 << 30  # what a CUDA context and its kernels take per worker, beyond the caching allocator
FIT_SHARE = 0.9  # the group's workers keep their caches while their peaks fit in this share of the device


@dataclass(frozen=True)
class Sampling:
    kept_per_round: int = 1
    discarded_per_round: int = 0
    order: str = "rotating"  # round r starts with the (r mod n)-th case
    cuda_cache: str = "not applicable"  # "kept between rounds" or "emptied after each round", with why

    def to_dict(self) -> dict:
        return asdict(self)


def for_device(device: str, kept_per_round: int) -> Sampling:
    if device.startswith("cuda"):
        return Sampling(kept_per_round, discarded_per_round=1, cuda_cache="undecided")
    return Sampling(kept_per_round)


def keep_last(timed: Callable[[], dict[str, float]], kept: int, discarded: int) -> dict[str, list[float]]:
    """kept + discarded consecutive calls of timed (name -> seconds), the first `discarded` dropped:
    name -> the kept samples."""
    samples: dict[str, list[float]] = {}
    for i in range(discarded + kept):
        for name, value in timed().items():
            if i >= discarded:
                samples.setdefault(name, []).append(value)
    return samples


def rotated(items: list[T], round_index: int) -> list[T]:
    """The round's order: A B C, then B C A, then C A B, ..."""
    if not items:
        return []
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def cache_policy(peak_reserved_bytes: list[int], device_total_bytes: int) -> tuple[bool, str]:
    """Whether the group's workers may keep their caching allocators warm between rounds, and why.

    Kept caches make every sample a steady-state step; they are kept only while every worker's
    measured peak, plus its CUDA context, fits on the device together.
    """
    need = sum(peak_reserved_bytes) + CONTEXT_BYTES * len(peak_reserved_bytes)
    budget = int(FIT_SHARE * device_total_bytes)
    gib = 2**30
    if need <= budget:
        return True, f"kept between rounds ({need / gib:.1f} GiB for {len(peak_reserved_bytes)} workers fit in {budget / gib:.1f} GiB)"
    return False, (f"emptied after each round ({need / gib:.1f} GiB for {len(peak_reserved_bytes)} workers exceed "
                   f"{budget / gib:.1f} GiB; the first call of each round, which refills the cache, is discarded)")
