"""A vocabulary padded for the mesh changes no logit of a real token, and no padded id is ever generated."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine
import opt_utils
from plan import Request, Sampling, SlotShapes
from runner import SlotRunner
from sharding import make_mesh, param_shardings, path_name
from weights import VOCAB_AXES, abstract_params, random_params
from modeling_flax_opt import KVCache, OPTForCausalLM

# OPT's 50272 ids padded to a multiple of 3 (as for 3 or 6 devices): 50274, two padded ids.
CONFIG = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=64)
V = CONFIG.vocab_size
UNPADDED = OPTForCausalLM(CONFIG, jnp.float32)
PADDED = OPTForCausalLM(CONFIG, jnp.float32, vocab_multiple=3)


def flat(params: Any) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def with_head_padding(params: Any, padding: np.ndarray) -> Any:
    """`params` of UNPADDED with zero embedding rows and the LM head columns `padding` [Dw, 2] appended."""
    padded = jax.tree_util.tree_map(np.asarray, params)
    padded["embed_tokens"]["embedding"] = np.pad(padded["embed_tokens"]["embedding"], ((0, 2), (0, 0)))
    padded["lm_head"]["kernel"] = np.concatenate([padded["lm_head"]["kernel"], padding], axis=1)
    return padded


@pytest.fixture(scope="module")
def params() -> Any:
    """UNPADDED's random weights on one device."""
    return random_params(UNPADDED, make_mesh(jax.devices()[:1], CONFIG), seed=0)


def last_logits(model: OPTForCausalLM) -> Callable[[Any, np.ndarray], jax.Array]:
    """(params, tokens [B, T]) -> [B, V_padded] logits of each row's last token, by one full forward pass."""

    def run(p: Any, tokens: jax.Array) -> jax.Array:
        B, T = tokens.shape
        cache = KVCache.zeros(CONFIG, B, T, jnp.float32)
        return model.apply({"params": p}, tokens, cache, jnp.int32(0), jnp.zeros((B,), jnp.int32))[0]

    return jax.jit(run)


def test_padded_vocabulary_size_rounds_up_to_the_multiple() -> None:
    assert UNPADDED.padded_vocab_size == 50272
    assert PADDED.padded_vocab_size == 50274
    assert OPTForCausalLM(CONFIG, vocab_multiple=32).padded_vocab_size == 50272  # 2^5 divides it already
    shapes = abstract_params(PADDED)
    assert shapes["embed_tokens"]["embedding"].shape == (50274, 96)
    assert shapes["lm_head"]["kernel"].shape == (96, 50274)


def test_padded_model_gives_the_unpadded_logits_on_real_ids_and_float32_min_on_padded_ids(params: Any) -> None:
    tokens = np.random.default_rng(0).integers(3, V, (2, 12), dtype=np.int32)
    expected = np.asarray(last_logits(UNPADDED)(params, tokens))
    zeros = np.zeros((CONFIG.word_embed_proj_dim, 2), np.float32)
    logits = np.asarray(last_logits(PADDED)(with_head_padding(params, zeros), tokens))
    assert logits.shape == (2, 50274)
    np.testing.assert_array_equal(logits[:, :V], expected)
    np.testing.assert_array_equal(logits[:, V:], np.finfo(np.float32).min)


def test_greedy_and_sampled_generation_never_pick_a_padded_id_and_equal_the_unpadded_model(params: Any) -> None:
    # Opposite large head columns for the two padded ids: one of their raw logits is positive and, unless
    # the hidden state is nearly orthogonal to them, far above every real one. The guard shows that
    # without the mask the first token of some prompt would be a padded id.
    r = np.random.default_rng(1).normal(0.0, 10.0, (CONFIG.word_embed_proj_dim, 1)).astype(np.float32)
    padded_params = with_head_padding(params, np.concatenate([r, -r], axis=1))
    prompts = np.random.default_rng(2).integers(4, V, (3, 16), dtype=np.int32)
    unmasked = OPTForCausalLM(dataclasses.replace(CONFIG, vocab_size=PADDED.padded_vocab_size), jnp.float32)
    assert np.any(np.argmax(last_logits(unmasked)(padded_params, prompts), axis=-1) >= V)

    mesh = make_mesh(jax.devices()[:1], CONFIG)
    # Cheap shapes (one prompt bucket, one prefill row, one window): compiling dominates this test.
    shapes = SlotShapes.make(slots=2, max_positions=32, chunk=32, prefill_tokens=32)
    assert (shapes.prefill_shapes(), shapes.windows) == ([(1, 32)], (32,))
    # Three greedy requests, then one sampled over the whole vocabulary at a high temperature.
    requests = [Request(tuple(int(t) for t in prompt), m) for prompt, m in zip(prompts, (9, 4, 12))]
    sampled = Sampling(temperature=5.0, seed=4)
    requests.append(Request(tuple(int(t) for t in prompts[0]), 12, sampled))
    results = []
    for model, p in ((UNPADDED, params), (PADDED, padded_params)):
        placed = jax.device_put(p, param_shardings(p, mesh))
        runner = SlotRunner(model=model, params=placed, mesh=mesh, shapes=shapes)
        runner.warm_up()
        results.append(engine.Scheduler(runner, eos_id=CONFIG.eos_token_id).generate(requests))
    assert [len(row) for row in results[0]] == [r.max_new_tokens for r in requests]  # no EOS: every step counts
    assert all(t < V for row in results[1] for t in row)
    assert results[1] == results[0]


# Untied, the head's own random draw is one a padded shape would change: it must be drawn unpadded.
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_random_params_of_a_padded_model_on_two_devices_equal_the_unpadded_ones_on_one_with_zero_padding(
    tied: bool,
) -> None:
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    one, two = make_mesh(jax.devices()[:1], config), make_mesh(jax.devices()[:2], config)
    params = random_params(OPTForCausalLM(config, jnp.float32), one, seed=0)
    # 50274 rows: 25137 per device, the last two padding.
    padded = random_params(OPTForCausalLM(config, jnp.float32, vocab_multiple=3), two, seed=0)
    assert padded["embed_tokens"]["embedding"].sharding.num_devices == 2
    expected, got = flat(params), flat(padded)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        axis = VOCAB_AXES.get(name)
        if axis is not None:
            assert value.shape[axis] == 50274, name
            np.testing.assert_array_equal(value.take(range(V, 50274), axis=axis), 0.0, err_msg=name)
            value = value.take(range(V), axis=axis)
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
