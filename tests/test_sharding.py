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

import opt_utils
from modeling_flax_opt import OPTForCausalLM

CONFIG = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=256)
TESTS = Path(__file__).resolve().parent


def test_each_of_two_devices_holds_half_of_every_split_parameter():
    assert len(jax.devices()) >= 2, "conftest.py asks XLA for simulated CPU devices"
    model = OPTForCausalLM(CONFIG, jnp.float16)
    params = opt_utils.random_params(model, opt_utils.make_mesh(jax.devices()[:2], CONFIG))
    split, replicated = opt_utils.split_and_replicated_bytes(params)
    held = opt_utils.per_device_bytes(params)
    assert len(held) == 2
    assert split > replicated  # the check below would be weak if little were split
    for device_bytes in held.values():
        assert device_bytes == replicated + split // 2


def test_a_mesh_the_heads_do_not_divide_is_an_error_naming_them():
    config = dataclasses.replace(CONFIG, num_attention_heads=2, hidden_size=64)
    try:
        opt_utils.make_mesh(jax.devices()[:1] * 3, config)
    except ValueError as error:
        assert "num_attention_heads=2" in str(error)
    else:
        raise AssertionError("a 3-way mesh over 2 heads was accepted")


def test_generation_on_two_devices_gives_the_tokens_of_one_device():
    model = OPTForCausalLM(CONFIG, jnp.float32)
    one = opt_utils.make_mesh(jax.devices()[:1], CONFIG)
    two = opt_utils.make_mesh(jax.devices()[:2], CONFIG)
    params_one = opt_utils.random_params(model, one, seed=3)
    params_two = jax.device_put(params_one, opt_utils.param_shardings(params_one, two))
    buckets = opt_utils.Buckets.make(max_batch_size=4, max_positions=CONFIG.max_position_embeddings, chunk=16)
    rng = np.random.default_rng(0)
    requests = [opt_utils.Request(tuple(int(t) for t in rng.integers(4, CONFIG.vocab_size, n)), m)
                for n, m in ((5, 9), (20, 4), (1, 12))]
    results = []
    for mesh, params in ((one, params_one), (two, params_two)):
        generator = opt_utils.Generator(model=model, params=params, mesh=mesh, buckets=buckets)
        generator.warm_up([(4, 128)])
        results.append(generator.generate(requests).tokens)
    assert all(len(row) <= r.max_new_tokens for row, r in zip(results[0], requests))
    assert sum(len(row) for row in results[0]) > 0
    assert results[0] == results[1]


def real_values_digest(params: Any, vocab_size: int) -> str:
    """A hash of every parameter's values with the padded vocabulary rows and columns cut off."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        value = np.asarray(leaf)
        axis = opt_utils.VOCAB_AXES.get(opt_utils.path_name(path))
        if axis is not None:
            value = value.take(range(vocab_size), axis=axis)
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def generate_on_one_and_six_devices() -> dict[str, Any]:
    """Random/tiny on one device and on six (vocabulary padded 50272 -> 50274): what each holds and says.

    Runs in a subprocess that has six simulated devices (this process has two).
    """
    config = dataclasses.replace(CONFIG, max_position_embeddings=64)
    buckets = opt_utils.Buckets.make(max_batch_size=4, max_positions=config.max_position_embeddings, chunk=16)
    rng = np.random.default_rng(0)
    requests = [opt_utils.Request(tuple(int(t) for t in rng.integers(4, config.vocab_size, n)), m)
                for n, m in ((5, 9), (20, 4), (1, 12))]
    report: dict[str, Any] = {}
    for name, devices in (("one", jax.devices()[:1]), ("six", jax.devices()[:6])):
        mesh = opt_utils.make_mesh(devices, config)
        model = opt_utils.build_model(config, dtype=jnp.float32, mesh=mesh)
        params = opt_utils.random_params(model, mesh, seed=3)
        generator = opt_utils.Generator(model=model, params=params, mesh=mesh, buckets=buckets)
        generator.warm_up([(4, 80)])
        split, replicated = opt_utils.split_and_replicated_bytes(params)
        report[name] = dict(padded_vocab_size=model.padded_vocab_size, split=split, replicated=replicated,
                            held=sorted(opt_utils.per_device_bytes(params).values()),
                            digest=real_values_digest(params, config.vocab_size),
                            tokens=generator.generate(requests).tokens)
    return report


def test_six_devices_each_hold_a_sixth_of_the_padded_split_parameters_and_generate_the_tokens_of_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=6",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    code = "import json, test_sharding; print(json.dumps(test_sharding.generate_on_one_and_six_devices()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    one, six = report["one"], report["six"]
    assert (one["padded_vocab_size"], six["padded_vocab_size"]) == (50272, 50274)  # 50272 % 6 == 4
    assert len(six["held"]) == 6
    assert six["split"] > six["replicated"]
    assert six["held"] == [six["replicated"] + six["split"] // 6] * 6
    assert six["digest"] == one["digest"]  # random_params draws the same values whatever the mesh
    assert sum(len(row) for row in one["tokens"]) > 0
    assert six["tokens"] == one["tokens"]
