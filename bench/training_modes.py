"""Training modes: the precision (torch.autocast, with a GradScaler for float16), the memory format
and torch.compile a workload runs in.

A mode is chosen through suite options (``precision``, ``channels_last``, ``compile``; the command
line's ``--precision``, ``--channels-last`` and ``--compile``) and is a typed field of every case
that runs in one (bench.suite.Case.mode), named in table titles; the gate refuses to compare runs
of different modes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

BACKEND = "inductor"  # torch.compile's default; tests swap in "eager" (dynamo's capture only) for speed
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Suite options (name -> allowed values, the first the default), for suites that run in any mode.
OPTIONS = {"precision": tuple(PRECISIONS), "channels_last": ("off", "on"), "compile": ("off", "on")}


@dataclass(frozen=True)
class Mode:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Mode:
        """The mode that suite options ask for ("on"/"off" strings; fp32, eager, contiguous by default)."""
        return cls(options.get("precision", "fp32"), options.get("channels_last") == "on", options.get("compile") == "on")

    def options(self) -> dict[str, str]:
        return {"precision": self.precision, "channels_last": _on(self.channels_last), "compile": _on(self.compile)}

    @property
    def flags(self) -> str:
        """The command-line flags that select this mode, e.g. " --precision bf16 --compile" ("" for the default)."""
        return ((f" --precision {self.precision}" if self.precision != "fp32" else "")
                + (" --channels-last" if self.channels_last else "") + (" --compile" if self.compile else ""))

    @property
    def slug(self) -> str:
        """A file-name suffix: empty for the default mode, else e.g. "-bf16-channels_last-compiled"."""
        return "" if self == Mode() else "-" + self.label.replace(", ", "-")

    @property
    def label(self) -> str:
        """e.g. "fp32, eager" or "bf16, channels_last, compiled"."""
        parts = [self.precision] + (["channels_last"] if self.channels_last else [])
        return ", ".join(parts + ["compiled" if self.compile else "eager"])

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """float16 needs loss scaling (its range underflows small gradients); bfloat16 does not."""
        return torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def compile_in_place(self, module: nn.Module) -> None:
        """Compile module in place (nn.Module.compile: the module tree and state_dict keys stay)."""
        module.compile(backend=BACKEND)

    def memory_format(self, value: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
        """A module's weights, or a 4-d tensor, in this mode's memory format (as they are, if not channels_last)."""
        return value.to(memory_format=torch.channels_last) if self.channels_last else value

    def check(self, device: str) -> Mode:
        """This mode, if it can run on device (fp16 is CUDA-only); a ValueError naming the fix otherwise."""
        if self.precision == "fp16" and device == "cpu":
            raise ValueError("precision fp16 runs on CUDA only here (CPU autocast to float16 has few fast kernels); "
                             "use --precision bf16 on CPU")
        return self


def from_args(args) -> Mode:
    """The mode the command line's --precision, --channels-last and --compile ask for."""
    return Mode(args.precision or "fp32", args.channels_last, args.compile)


def takes_mode(suite) -> bool:
    """Whether a suite module runs in any mode (its OPTIONS include the mode options)."""
    return all(suite.OPTIONS.get(name) == values for name, values in OPTIONS.items())


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """loss.backward() and optimizer.step(), through the GradScaler when there is one."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
