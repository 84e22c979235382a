"""The one table of optional inputs and the layers that derive from it; the host-side modules import no jax."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import channel
import client
import plan
from protocol import OPTIONAL_INPUTS, VOCAB, Settings

ROOT = Path(__file__).resolve().parent.parent
# The scheduler and everything else that runs only on rank 0's host, or between the hosts.
HOST_MODULES = ("engine", "plan", "channel", "protocol", "metrics", "reaper", "triton_models", "cancellation",
                "client", "openai_api")


def test_every_layer_takes_its_settings_from_the_table() -> None:
    names = [o.name for o in OPTIONAL_INPUTS]
    assert [f.name for f in dataclasses.fields(Settings)] == names  # what the client sends
    assert client.Sampling is Settings and list(client.SETTING_DTYPES) == names
    sampled = [o.name for o in OPTIONAL_INPUTS if o.sampling]
    assert [f.name for f in dataclasses.fields(plan.Sampling)] == sampled  # what every rank runs
    assert [o.name for o in channel.SAMPLING_INPUTS] == sampled
    assert channel.ROW_WORDS == channel.ROW_HEAD_WORDS + sum(channel.setting_words(o) for o in channel.SAMPLING_INPUTS)
    assert set(names) - set(sampled) == {"timeout_seconds"}  # rank 0's alone: the deadline


def test_the_client_has_one_flag_per_input_and_sends_only_those_given() -> None:
    args = client.parse_args(["--temperature", "0.5", "--top-k", "3", "--deadline", "2", "--ignore-eos"])
    assert client.sampling_from_args(args) == Settings(temperature=0.5, top_k=3, ignore_eos=True, timeout_seconds=2.0)
    assert client.sampling_from_args(args).given() == {"temperature": 0.5, "top_k": 3, "ignore_eos": True,
                                                       "timeout_seconds": 2.0}


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("temperature", -0.5, "must be >= 0 and <= 100"),
    ("temperature", np.inf, "must be >= 0 and <= 100"),
    ("top_k", 51, "must be >= 0 and <= 50 (0: off)"),
    ("top_p", 0.0, "must be > 0 and <= 1"),
    ("seed", -1, "must be >= 0"),
    ("timeout_seconds", np.nan, "must be > 0 and <= 86400"),
])
def test_each_bound_of_the_table_refuses_with_a_message(name: str, value: object, problem: str) -> None:
    option = next(o for o in OPTIONAL_INPUTS if o.name == name)
    assert option.problem(option.dtype(value), vocab_size=50) == problem


def test_the_tables_edges_are_accepted() -> None:
    for option in OPTIONAL_INPUTS:
        for edge in (option.low, option.high):
            if edge is not None and not (edge == option.low and option.low_open):
                value = 50 if edge == VOCAB else edge
                assert option.problem(option.dtype(value), vocab_size=50) is None, (option.name, value)


@pytest.mark.parametrize("module", HOST_MODULES)
def test_host_side_modules_import_no_jax(module: str) -> None:
    code = f"import sys; import {module}; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
