"""Benchmark definitions: detection models, synthetic data and the suites built on them.

``SUITES`` is the registry the harness reads (``python -m bench [SUITE ...]``);
``MICRO_BENCHMARKS`` is the pytest-benchmark file ``python -m bench micro`` runs.
"""

from pathlib import Path

SUITES = {
    "table6": "suites.table6",
    "gradpath": "suites.gradpath",
}
MICRO_BENCHMARKS = Path(__file__).with_name("micro.py")
