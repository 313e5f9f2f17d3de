"""Capture the environment a run happened in, so results say where they came from."""

from __future__ import annotations

import hashlib
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from bench.results import Environment

OPTIONAL_TOOLS = ("torchvision", "fvcore", "nvidia-ml-py", "rich", "matplotlib", "pytest-benchmark")


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def capture(device: str, argv: list[str] | None = None) -> Environment:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return Environment(
        device_name=device_name(device),
        device_count=torch.cuda.device_count() if cuda else 1,
        driver_version=nvidia_driver() if cuda else None,
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version() if cuda else None,
        torch_version=torch.__version__,
        torchvision_version=_version("torchvision"),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        threads=torch.get_num_threads(),
        cpu_model=cpu_model(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if _git("rev-parse", "HEAD") is None else bool(_git("status", "--porcelain", "--untracked-files=no")),
        date_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        optional_tools={name: _version(name) or "not installed" for name in OPTIONAL_TOOLS},
        cbn_source=cbn_source_digest(),
    )


def cbn_source_digest() -> str:
    """The first 12 hex digits of a SHA-256 over the cbn package's source files: what CBN computes,
    and so what FLOP counters see, changes with it (stored counts are keyed by it, bench/counts.py)."""
    import cbn

    digest = hashlib.sha256()
    for path in sorted(Path(cbn.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def device_name(device: str) -> str:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return torch.cuda.get_device_name(0) if cuda else f"cpu: {cpu_model()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception as err:  # reported, not swallowed: the field says why
        return f"unavailable: {type(err).__name__}: {err}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
