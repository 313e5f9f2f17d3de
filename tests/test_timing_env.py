import time

import torch

from bench import env
from bench.timing import time_call, time_calls


def test_time_call_measures_the_call_and_keeps_raw_samples():
    samples = time_calls(lambda: time.sleep(0.02), torch.device("cpu"), 3)
    assert len(samples) == 3
    assert all(0.02 <= s < 1.0 for s in samples)
    assert time_call(lambda: None, torch.device("cpu")) < 0.02


def test_environment_says_where_a_result_came_from():
    e = env.capture("cpu", ["table6", "--profile", "cpu"])
    assert e.device_name.startswith("cpu: ") and e.device_count == 1
    assert e.torch_version == torch.__version__ and e.threads == torch.get_num_threads()
    assert e.command.endswith("-m bench table6 --profile cpu")
    assert e.git_commit is None or len(e.git_commit) == 40
    assert set(env.OPTIONAL_TOOLS) == set(e.optional_tools)
    assert e.date_utc.endswith("+00:00")
