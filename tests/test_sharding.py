"""Weights sharded over several devices (simulated CPU devices): each holds its part, and the text is the same."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine
import opt_utils
from plan import Request, Sampling, SlotShapes
from runner import SlotRunner
from sharding import make_mesh, param_shardings, path_name
from weights import VOCAB_AXES, build_model, per_device_bytes, random_params, split_and_replicated_bytes
from modeling_flax_opt import OPTForCausalLM

CONFIG = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=256)
TESTS = Path(__file__).resolve().parent


def test_each_of_two_devices_holds_half_of_every_split_parameter():
    assert len(jax.devices()) >= 2, "conftest.py asks XLA for simulated CPU devices"
    model = OPTForCausalLM(CONFIG, jnp.float16)
    params = random_params(model, make_mesh(jax.devices()[:2], CONFIG))
    split, replicated = split_and_replicated_bytes(params)
    held = per_device_bytes(params)
    assert len(held) == 2
    assert split > replicated  # the check below would be weak if little were split
    for device_bytes in held.values():
        assert device_bytes == replicated + split // 2


def test_a_mesh_the_heads_do_not_divide_is_an_error_naming_them():
    config = dataclasses.replace(CONFIG, num_attention_heads=2, hidden_size=64)
    try:
        make_mesh(jax.devices()[:1] * 3, config)
    except ValueError as error:
        assert "num_attention_heads=2" in str(error)
    else:
        raise AssertionError("a 3-way mesh over 2 heads was accepted")


# Cheap shapes (one prompt bucket of 32, one prefill row, one window): compiling dominates these tests.
SHAPES = SlotShapes.make(slots=2, max_positions=32, chunk=32, prefill_tokens=32)


def requests(vocab_size: int) -> list[Request]:
    """Three greedy requests and a sampled one (vocabulary-wide: top-k off) for two slots."""
    rng = np.random.default_rng(0)
    prompt = lambda n: tuple(int(t) for t in rng.integers(4, vocab_size, n))
    return [Request(prompt(5), 9), Request(prompt(20), 4), Request(prompt(1), 12),
            Request(prompt(7), 10, Sampling(temperature=1.0, top_p=0.95, seed=11))]


def generate(model: OPTForCausalLM, params: Any, mesh: Any) -> list[list[int]]:
    runner = SlotRunner(model=model, params=params, mesh=mesh, shapes=SHAPES)
    runner.warm_up()
    return engine.Scheduler(runner, eos_id=model.config.eos_token_id).generate(requests(model.config.vocab_size))


@pytest.fixture(scope="module")
def one_device() -> dict[str, Any]:
    """Random/tiny (seed 3) on one device: its model, weights, their digest and the tokens of `requests`."""
    model = OPTForCausalLM(CONFIG, jnp.float32)
    mesh = make_mesh(jax.devices()[:1], CONFIG)
    params = random_params(model, mesh, seed=3)
    tokens = generate(model, params, mesh)
    assert [len(row) for row in tokens] == [r.max_new_tokens for r in requests(CONFIG.vocab_size)]  # no EOS
    return dict(model=model, params=params, digest=real_values_digest(params, CONFIG.vocab_size), tokens=tokens)


def test_generation_on_two_devices_gives_the_tokens_of_one_device(one_device: dict[str, Any]):
    two = make_mesh(jax.devices()[:2], CONFIG)
    params = one_device["params"]
    params_two = jax.device_put(params, param_shardings(params, two))
    assert generate(one_device["model"], params_two, two) == one_device["tokens"]


def real_values_digest(params: Any, vocab_size: int) -> str:
    """A hash of every parameter's values with the padded vocabulary rows and columns cut off."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        value = np.asarray(leaf)
        axis = VOCAB_AXES.get(path_name(path))
        if axis is not None:
            value = value.take(range(vocab_size), axis=axis)
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def generate_on_six_devices() -> dict[str, Any]:
    """Random/tiny (seed 3) on six devices (vocabulary padded 50272 -> 50274): what each holds and says.

    Runs in a subprocess that has six simulated devices (this process has two).
    """
    mesh = make_mesh(jax.devices()[:6], CONFIG)
    model = build_model(CONFIG, dtype=jnp.float32, mesh=mesh)
    params = random_params(model, mesh, seed=3)
    split, replicated = split_and_replicated_bytes(params)
    return dict(padded_vocab_size=model.padded_vocab_size, split=split, replicated=replicated,
                held=sorted(per_device_bytes(params).values()),
                digest=real_values_digest(params, CONFIG.vocab_size), tokens=generate(model, params, mesh))


def test_six_devices_each_hold_a_sixth_of_the_padded_split_parameters_and_generate_the_tokens_of_one(
    one_device: dict[str, Any],
):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=6",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    code = "import json, test_sharding; print(json.dumps(test_sharding.generate_on_six_devices()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    six = json.loads(result.stdout.strip().splitlines()[-1])
    assert (one_device["model"].padded_vocab_size, six["padded_vocab_size"]) == (50272, 50274)  # 50272 % 6 == 4
    assert len(six["held"]) == 6
    assert six["split"] > six["replicated"]
    assert six["held"] == [six["replicated"] + six["split"] // 6] * 6
    assert six["digest"] == one_device["digest"]  # random_params draws the same values whatever the mesh
    assert six["tokens"] == one_device["tokens"]  # the sampled request's too: its noise ignores the padded ids
