"""pytest options and machine info for the micro-benchmarks in suites/micro.py."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import pytest
import torch

from bench import env
from bench.training_modes import OPTIONS, Mode

MICRO_SCHEMA = "cbn-bench/micro"
MICRO_SCHEMA_VERSION = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cbn-bench micro-benchmarks")
    group.addoption("--micro-device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    group.addoption("--micro-threads", type=int, help="torch CPU threads (default: torch's)")
    for key, values in OPTIONS.items():  # the training mode (bench/training_modes.py)
        group.addoption(f"--micro-{key.replace('_', '-')}", choices=values, default=values[0], help=f"default: {values[0]}")


def _device(config: pytest.Config) -> str:
    return config.getoption("--micro-device") or env.best_device()


@pytest.fixture(scope="session")
def micro_device(request: pytest.FixtureRequest) -> torch.device:
    device = _device(request.config)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.exit("--micro-device cuda, but torch sees no CUDA device", returncode=2)
    return torch.device(device)


@pytest.fixture(scope="session")
def micro_mode(request: pytest.FixtureRequest) -> Mode:
    return _mode(request.config)


def _mode(config: pytest.Config) -> Mode:
    return Mode.from_options({key: config.getoption(f"--micro-{key.replace('_', '-')}") for key in OPTIONS})


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--micro-threads", None)
    if threads:
        torch.set_num_threads(threads)


def _command() -> str:
    return shlex.join([Path(sys.executable).name, "-m", "pytest", *sys.argv[1:]])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Say where the figures came from, in the same terms as cbn-bench's results files."""
    device = _device(config)
    machine_info["cbn_bench"] = {
        "schema": MICRO_SCHEMA,
        "schema_version": MICRO_SCHEMA_VERSION,
        "device": device,
        "profile": device,  # suites/micro.py's SHAPES are per device type
        "timer": str(config.getoption("benchmark_timer", None) or "time.perf_counter"),
        "mode": _mode(config).options(),
        "environment": dataclasses.asdict(dataclasses.replace(env.capture(device), command=_command())),
    }
