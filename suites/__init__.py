"""Benchmark definitions: detection models, synthetic data and the suites built on them.

``SUITES`` is the registry the harness reads (``python -m bench [SUITE ...]``).
"""

SUITES = {
    "table6": "suites.table6",
    "gradpath": "suites.gradpath",
}
