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
# torch.compile's modes; "reduce-overhead" records CUDA graphs, so it needs a CUDA device.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Suite options (name -> allowed values, the first the default), for suites that run in any mode.
OPTIONS = {"precision": tuple(PRECISIONS), "channels_last": ("off", "on"), "compile": ("off", *COMPILE_MODES),
           "fullgraph": ("off", "on")}


@dataclass(frozen=True)
class Mode:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode, one of COMPILE_MODES (when compile)
    fullgraph: bool = False  # torch.compile(fullgraph=True): a graph break is an error (when compile)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        if not self.compile and (self.fullgraph or self.compile_mode != "default"):
            raise ValueError("a compile mode or fullgraph needs compiling: add --compile")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Mode:
        """The mode that suite options ask for (fp32, eager, contiguous by default). "compile" is
        "off" or a torch.compile mode ("on", from files before the modes, is "default")."""
        compile_mode = {"on": "default"}.get(options.get("compile", "off"), options.get("compile", "off"))
        compiled = compile_mode != "off"
        return cls(options.get("precision", "fp32"), options.get("channels_last") == "on", compiled,
                   compile_mode if compiled else "default", options.get("fullgraph") == "on")

    def options(self) -> dict[str, str]:
        return {"precision": self.precision, "channels_last": _on(self.channels_last),
                "compile": self.compile_mode if self.compile else "off", "fullgraph": _on(self.fullgraph)}

    @property
    def flags(self) -> str:
        """The command-line flags that select this mode, e.g. " --precision bf16 --compile" ("" for the default)."""
        compiled = "" if not self.compile else " --compile" + ("" if self.compile_mode == "default" else f" {self.compile_mode}")
        return ((f" --precision {self.precision}" if self.precision != "fp32" else "")
                + (" --channels-last" if self.channels_last else "") + compiled + (" --fullgraph" if self.fullgraph else ""))

    @property
    def slug(self) -> str:
        """A file-name suffix: empty for the default mode, else e.g. "-bf16-channels_last-compiled"."""
        return "" if self == Mode() else "-" + self.label.replace(", ", "-").replace(" ", "-")

    @property
    def label(self) -> str:
        """e.g. "fp32, eager", "bf16, channels_last, compiled" or "fp32, compiled reduce-overhead fullgraph"."""
        parts = [self.precision] + (["channels_last"] if self.channels_last else [])
        if not self.compile:
            return ", ".join([*parts, "eager"])
        how = "".join([" " + self.compile_mode if self.compile_mode != "default" else "", " fullgraph" if self.fullgraph else ""])
        return ", ".join([*parts, "compiled" + how])

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """float16 needs loss scaling (its range underflows small gradients); bfloat16 does not."""
        return torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def compile_in_place(self, module: nn.Module) -> None:
        """Compile module in place (nn.Module.compile: the module tree and state_dict keys stay), in
        this mode's torch.compile mode (inductor's; the test backends take none) and fullgraph."""
        options: dict = {"mode": self.compile_mode} if BACKEND == "inductor" and self.compile_mode != "default" else {}
        module.compile(backend=BACKEND, fullgraph=self.fullgraph, **options)

    def memory_format(self, value: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
        """A module's weights, or a 4-d tensor, in this mode's memory format (as they are, if not channels_last)."""
        return value.to(memory_format=torch.channels_last) if self.channels_last else value

    def check(self, device: str) -> Mode:
        """This mode, if it can run on device (fp16 is CUDA-only); a ValueError naming the fix otherwise."""
        if self.precision == "fp16" and device == "cpu":
            raise ValueError("precision fp16 runs on CUDA only here (CPU autocast to float16 has few fast kernels); "
                             "use --precision bf16 on CPU")
        if self.compile and self.compile_mode == "reduce-overhead" and device == "cpu":
            raise ValueError("--compile reduce-overhead records CUDA graphs, which need a CUDA device; on CPU use "
                             "--compile (default) or --compile max-autotune-no-cudagraphs")
        return self


def from_args(args) -> Mode:
    """The mode the command line's --precision, --channels-last, --compile [MODE] and --fullgraph ask for."""
    compiled = args.compile is not None
    return Mode(args.precision or "fp32", args.channels_last, compiled, args.compile or "default", args.fullgraph)


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
