"""Counted memory of a training step against hand-computed byte counts; CUDA and NVML peaks through fakes."""

import sys
import types

import torch
from torch import nn

import cbn
from bench.memory import SavedTensors, counted_training_memory, cuda_peak_memory, nvml_handle, nvml_memory, storage_bytes


def test_storage_bytes_counts_each_storage_once():
    t = torch.zeros(10, 10)
    assert storage_bytes([t, t[0], t.view(100)]) == 400
    assert storage_bytes([t], exclude={t.untyped_storage().data_ptr()}) == 0


def test_saved_tensors_of_a_conv_and_a_square():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.randn(2, 3, 8, 8)
    with SavedTensors() as saved:
        loss = conv(x).square().sum()
    params = {conv.weight.untyped_storage().data_ptr()}
    # the conv saves its input (2*3*8*8 floats), square saves its input (2*4*6*6 floats)
    assert storage_bytes(saved.tensors, exclude=params) == 4 * (2 * 3 * 8 * 8 + 2 * 4 * 6 * 6)
    loss.backward()


def test_counted_training_memory_of_a_small_cbn_net():
    net = cbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), window=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        counted = counted_training_memory(net, opt, lambda: net(x).square().sum())
    params = 4 * (4 * 3 * 3 * 3 + 4 + 4)  # conv weight, gamma, beta
    assert counted["parameters_bytes"] == params
    assert counted["gradients_bytes"] == params
    assert counted["optimizer_state_bytes"] == params  # SGD momentum buffers
    assert counted["cbn_history_bytes"] == net[1].history_bytes() > 0
    assert counted["saved_activations_bytes"] > 4 * 2 * 3 * 8 * 8
    assert counted["counted_total_bytes"] == sum(v for k, v in counted.items() if k != "counted_total_bytes")
    again = counted_training_memory(net, opt, lambda: net(x).square().sum())
    assert again == counted  # deterministic: same shapes, same count


# ---------------------------------------------------------------------- CUDA and NVML, through fakes
class FakeNvml:
    """pynvml with two GPUs whose physical order is the reverse of what torch sees."""

    def __init__(self, processes_see_pid: bool = True):
        import os

        self.devices = {"GPU-aaaa": (11 << 30, 3 << 30), "GPU-bbbb": (22 << 30, 7 << 30)}  # uuid -> (used, this process)
        self.by_index = ["GPU-bbbb", "GPU-aaaa"]
        self.pid = os.getpid() if processes_see_pid else -1

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.by_index[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.devices[handle][0])

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=self.pid, usedGpuMemory=self.devices[handle][1])]


def fake_cuda(monkeypatch, nvml, uuid="aaaa"):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    props = types.SimpleNamespace(uuid=uuid, total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # torch's index 0 is NVML's index 1 here
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 6 << 30)


def test_nvml_figures_come_from_the_gpu_torch_uses_when_devices_are_reordered(monkeypatch):
    fake_cuda(monkeypatch, FakeNvml())
    metrics, notes = cuda_peak_memory(lambda: None, torch.device("cuda"))
    assert metrics == {"peak_allocated_bytes": 5 << 30, "peak_reserved_bytes": 6 << 30,
                       "nvml_device_used_bytes": 11 << 30, "nvml_process_bytes": 3 << 30}
    assert notes == []


def test_nvml_missing_or_hiding_pids_is_a_note_not_an_error(monkeypatch):
    fake_cuda(monkeypatch, FakeNvml(processes_see_pid=False))
    metrics, notes = nvml_memory(torch.device("cuda"))
    assert metrics == {"nvml_device_used_bytes": 11 << 30}
    assert notes == ["NVML lists no memory for this process (containers often hide PIDs)"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    metrics, notes = nvml_memory(torch.device("cuda"))
    assert metrics == {} and notes[0].startswith("NVML unavailable: ModuleNotFoundError") and "pynvml" in notes[0]


def test_without_a_uuid_the_pci_bus_id_finds_the_device():
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    nvml = types.SimpleNamespace(nvmlDeviceGetHandleByPciBusId=lambda bus: f"handle {bus}")
    assert nvml_handle(nvml, props) == ("handle 00000000:1B:00.0", "PCI bus id 00000000:1B:00.0")
