"""Memory of a training step: allocator and NVML peaks on CUDA, a deterministic count on CPU.

CPU has no allocator peak, so the step's memory is counted from what it holds: parameters,
gradients, optimizer state, tensors saved for backward (seen through saved-tensor hooks, each
storage once) and CBN history. The same shapes always give the same count. The process peak RSS
is recorded beside it, as a cross-check that includes everything else (allocator slack, threads).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class HoldsHistory(Protocol):
    """A module that keeps state across training steps (CBN's window) and says how many bytes."""

    def history_bytes(self) -> int: ...


def storage_bytes(tensors: Iterable[torch.Tensor | None], exclude: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind tensors (views share one), minus excluded storages."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class SavedTensors:
    """Context manager collecting the tensors autograd saves for backward."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors.append(tensor)
        return tensor


def counted_training_memory(model: nn.Module, optimizer: torch.optim.Optimizer,
                            forward_loss: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Run one training step and count what it holds at its peak (just before backward)."""
    params = [p for p in model.parameters()]
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    with SavedTensors() as saved:
        loss = forward_loss()
    activations = storage_bytes(saved.tensors, exclude=param_storages)
    loss.backward()
    optimizer.step()
    counted = {
        "parameters_bytes": storage_bytes(params),
        "gradients_bytes": storage_bytes(p.grad for p in params),
        "optimizer_state_bytes": storage_bytes(v for state in optimizer.state.values() for v in state.values()),
        "saved_activations_bytes": activations,
        "cbn_history_bytes": sum(m.history_bytes() for m in model.modules() if isinstance(m, HoldsHistory)),
    }
    optimizer.zero_grad()
    counted["counted_total_bytes"] = sum(counted.values())
    return counted


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_memory(step: Callable[[], object], device: torch.device) -> tuple[dict[str, int], list[str]]:
    """Allocator peaks of one call of step, and NVML's view of this process and the device."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    metrics = {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }
    nvml, notes = nvml_memory(device)
    return {**metrics, **nvml}, notes


def nvml_memory(device: torch.device) -> tuple[dict[str, int], list[str]]:
    """This process's GPU memory and the device's used memory from NVML (after the step, before
    the caching allocator releases anything, so the process figure is its peak footprint).

    NVML numbers devices physically, torch after CUDA_VISIBLE_DEVICES: the device is found by its
    UUID (or PCI bus id), never by torch's index. A missing or failing NVML is a note, not an error.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        handle, how = nvml_handle(pynvml, torch.cuda.get_device_properties(device))
        used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        metrics = {"nvml_device_used_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)}
        notes = [] if how == "uuid" else [f"NVML device found by {how}"]
        if used.get(os.getpid()) is not None:
            metrics["nvml_process_bytes"] = int(used[os.getpid()])
            return metrics, notes
        return metrics, notes + ["NVML lists no memory for this process (containers often hide PIDs)"]
    except Exception as err:  # an optional tool: its failure is reported in the result
        return {}, [f"NVML unavailable: {type(err).__name__}: {err}"]


def nvml_handle(pynvml, props) -> tuple[object, str]:
    """NVML's handle for the GPU torch describes with props, and how it was found."""
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}"), "uuid"
    if getattr(props, "pci_bus_id", None) is not None:
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), f"PCI bus id {bus_id}"
    raise RuntimeError(f"torch {torch.__version__} gives neither the UUID nor the PCI bus id of the device")
