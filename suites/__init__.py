"""Benchmark definitions: detection and classification models, synthetic data and the suites built on them.

``SUITES`` is the registry of harness suites (``python -m bench [SUITE ...]``), each a module that
satisfies ``bench.suite.Suite``; ``PYTEST_SUITES`` names the pytest-benchmark files that
``python -m bench micro`` runs (bench/pytest_suites.py reads their JSON as ordinary runs).
"""

from pathlib import Path

SUITES = {
    "table6": "suites.table6",
    "gradpath": "suites.gradpath",
    "classify": "suites.classify",
    "statistics": "suites.statistics",
    "quality": "suites.quality",
}
PYTEST_SUITES = {
    "micro": Path(__file__).with_name("micro.py"),
}
# What `python -m bench profile --suite` can profile, norm by norm: each module defines
# profiled_cases(norms, profile, device, options) -> (one case per norm, the profile used).
PROFILED = {
    "table6": "suites.table6",  # the detection training (and inference) step
    "micro": "suites.micro",  # one conv + norm layer step
}
