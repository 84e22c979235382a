"""Weights sharded over several devices (simulated CPU devices): each holds its part, and the text is the same."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import opt_utils
from modeling_flax_opt import OPTForCausalLM

CONFIG = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=256)


def split_and_replicated_bytes(params) -> tuple[int, int]:
    """(bytes of parameters the rules split, bytes they replicate), summed over the whole model."""
    split = replicated = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        spec = opt_utils.partition_spec(opt_utils.path_name(path))
        if opt_utils.MODEL_AXIS in tuple(spec):
            split += leaf.nbytes
        else:
            replicated += leaf.nbytes
    return split, replicated


def test_each_of_two_devices_holds_half_of_every_split_parameter():
    assert len(jax.devices()) >= 2, "conftest.py asks XLA for simulated CPU devices"
    model = OPTForCausalLM(CONFIG, jnp.float16)
    params = opt_utils.random_params(model, opt_utils.make_mesh(jax.devices()[:2], CONFIG))
    split, replicated = split_and_replicated_bytes(params)
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
