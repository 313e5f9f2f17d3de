"""Constants the suites share, and the gate with them: one definition each."""

WINDOW = 4  # CBN's k in every suite: the paper's Table 6 setting for 4 images per device

# The naive (dense Jacobian) statistic-gradient path is skipped when its estimated memory is over
# a budget: a fixed one on CPU, a share of the device's memory on CUDA.
CPU_NAIVE_BUDGET_BYTES = 8 << 30
CUDA_NAIVE_BUDGET_SHARE = 0.6

# The naive and efficient paths must give the same compensated statistics to this relative
# difference (float32); above it the gradpath case is an error, and the gate names it.
AGREEMENT_TOLERANCE = 1e-3

# The paper's claim that CBN's extra time is its extra FLOPs: CBN/BN step-time ratio over the
# training-FLOP ratio, at most this per device. table6 prints its verdict against the target;
# results/thresholds.toml enforces the same numbers (tests/test_thresholds.py keeps them equal).
# On CUDA the paper's own margin. On CPU the gate's small quick profile, where non-conv host work
# weighs more, measured 1.025-1.062 over five identical runs (docs/calibration.md), hence 1.10.
STEP_TIME_OVER_FLOPS_TARGET = {"cuda": 1.05, "cpu": 1.10}

# The same check on classification backbones (suites/classify.py), where CBN's bookkeeping weighs
# more: the goal on CPU is ResNet-18 at 4 x 224 px within 8% of its extra FLOPs. Not reached yet
# (docs/results.md), so classify prints its verdict against it while the gate holds the ratio
# to its baseline.
CLASSIFY_STEP_TIME_OVER_FLOPS_TARGET = {"cuda": 1.05, "cpu": 1.08}

# The A/A control: a second BN case in table6 and classify (and "bn-control" in the micro-benchmarks),
# whose ratio to BN measures only the run's noise. A run's control passes when its paired 95%
# interval lies within this margin of 1 (suites/ratios.py); results/thresholds.toml enforces the
# same numbers (tests/test_thresholds.py keeps them equal). On CUDA +-3%, what a GPU's steady-state
# steps allow (no GPU A/A run with this control yet). On a 2-core CPU, over ten A/A intervals of
# 2026-12-04 (two quick baselines and the cpu profile's run, table6 and classify, training and
# inference, one sample per round; docs/results.md), the farthest
# reached 0.092 to 0.223 from 1, hence 0.30: a wider interval means the machine was noisier than
# that, and the run's ratios are noise.
CONTROL = "bn_control"
CONTROL_MARGIN = {"cuda": 0.03, "cpu": 0.30}

# The profile a run uses when none is named: the paper's sizes on a GPU; without one, quick, so
# that the README's `nox -s bench` (every suite) finishes within half an hour on 2 cores. The cpu
# profile, which the committed CPU results use, takes about an hour and a half there: name it.
DEFAULT_PROFILE = {"cuda": "paper", "cpu": "quick"}


def default_profile(device: str) -> str:
    """Every suite's default_profile (bench.suite.Suite): DEFAULT_PROFILE for the device type."""
    return DEFAULT_PROFILE["cuda" if device == "cuda" else "cpu"]
