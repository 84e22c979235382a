"""The generation loop: phases with a fake model known by hand, the bucket plan, and the Generator end to end."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opt_utils
from modeling_flax_opt import KVCache, OPTConfig, OPTForCausalLM
from opt_utils import Buckets, DecodeState, Generator, Request, decode_step, path_name, plan_batches, prefill_chunk

# ---------------------------------------------------------------------------------------------------
# A fake model: the next token is the token asked about plus one
# ---------------------------------------------------------------------------------------------------

V = 16  # the fake's vocabulary
EOS = 2


def next_token_model(params: Any, tokens: jax.Array, cache: Any, start: jax.Array, last: jax.Array):
    """Logits peaking at (tokens[b, last[b]] + 1) % V; the "cache" it returns is the `start` it was called with."""
    token = jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0]
    return jax.nn.one_hot((token + 1) % V, V), start


def i32(*values: int) -> jax.Array:
    return jnp.asarray(values, jnp.int32)


def state(tokens, position, remaining, done) -> DecodeState:
    return DecodeState(tokens=i32(*tokens), position=i32(*position), remaining=i32(*remaining),
                       done=jnp.asarray(done, bool))


def test_prefill_chunk_gives_first_tokens_only_to_rows_whose_prompt_ends_in_the_chunk() -> None:
    # Chunk of 4 at offset 4 (positions 4..7). Prompts of 3, 6 and 9 tokens end before, in, and after it.
    tokens = jnp.asarray([[1, 1, 1, 1], [7, 9, 1, 1], [3, 4, 5, 6]], jnp.int32)
    first = i32(11, 12, 13)
    called_at, first = prefill_chunk(next_token_model, None, None, tokens, jnp.int32(4), i32(3, 6, 9), first)
    np.testing.assert_array_equal(called_at, [4, 4, 4])  # every row's chunk starts at the offset
    np.testing.assert_array_equal(first, [11, 10, 13])  # row 1's last prompt token is 9, at index 1


def test_prefill_chunk_reads_the_last_token_of_a_prompt_ending_at_the_chunk_edge() -> None:
    tokens = jnp.asarray([[5, 6, 7, 8], [5, 6, 7, 14]], jnp.int32)
    _, first = prefill_chunk(next_token_model, None, None, tokens, jnp.int32(0), i32(4, 4), i32(0, 0))
    np.testing.assert_array_equal(first, [9, 15])


def test_decode_step_advances_unfinished_rows_by_one_token_and_position() -> None:
    called_at, after = decode_step(next_token_model, None, None, state([5, 9], [3, 7], [4, 4], [False, False]), EOS)
    np.testing.assert_array_equal(called_at, [3, 7])  # each row's token goes to its own position
    np.testing.assert_array_equal(after.tokens, [6, 10])
    np.testing.assert_array_equal(after.position, [4, 8])
    np.testing.assert_array_equal(after.remaining, [3, 3])
    np.testing.assert_array_equal(after.done, [False, False])


def test_decode_step_stops_a_row_that_produces_eos() -> None:
    _, after = decode_step(next_token_model, None, None, state([EOS - 1, 5], [3, 3], [4, 4], [False, False]), EOS)
    np.testing.assert_array_equal(after.tokens, [EOS, 6])
    np.testing.assert_array_equal(after.done, [True, False])


def test_decode_step_stops_a_row_that_used_up_its_remaining_tokens() -> None:
    _, after = decode_step(next_token_model, None, None, state([5, 5], [3, 3], [1, 2], [False, False]), EOS)
    np.testing.assert_array_equal(after.tokens, [6, 6])  # the last allowed token is still produced
    np.testing.assert_array_equal(after.remaining, [0, 1])
    np.testing.assert_array_equal(after.done, [True, False])


def test_decode_step_freezes_finished_rows() -> None:
    before = state([EOS, 5], [6, 3], [2, 2], [True, False])
    s = before
    for _ in range(3):
        _, s = decode_step(next_token_model, None, None, s, EOS)
    # The live row made 6 then 7, ran out of tokens, and from then on stayed as the finished row did.
    np.testing.assert_array_equal(s.tokens, [EOS, 7])
    np.testing.assert_array_equal(s.position, [6, 5])
    np.testing.assert_array_equal(s.remaining, [2, 0])
    np.testing.assert_array_equal(s.done, [True, True])


# ---------------------------------------------------------------------------------------------------
# Buckets, requests and batch plans
# ---------------------------------------------------------------------------------------------------


def test_buckets_make_powers_of_two_up_to_the_limits() -> None:
    b = Buckets.make(max_batch_size=6, max_positions=2048, chunk=64)
    assert b.batch_sizes == (1, 2, 4, 6)
    assert b.cache_lengths == (128, 256, 512, 1024, 2048)
    assert b.chunk == 64


def test_buckets_make_ends_at_a_position_limit_that_is_no_power_of_two_and_never_below_the_chunk() -> None:
    b = Buckets.make(max_batch_size=1, max_positions=300, chunk=100)
    assert b.batch_sizes == (1,)
    assert b.cache_lengths == (128, 256, 300)
    assert Buckets.make(max_batch_size=1, max_positions=1000, chunk=200).cache_lengths == (256, 512, 1000)
    assert Buckets.make(max_batch_size=1, max_positions=40, chunk=64).chunk == 40


def test_buckets_make_rejects_a_kv_budget_below_one_full_length_sequence() -> None:
    with pytest.raises(ValueError, match="max_cache_tokens"):
        Buckets.make(max_batch_size=4, max_positions=2048, max_cache_tokens=1024)


def test_cache_length_is_the_smallest_bucket_holding_the_positions() -> None:
    b = Buckets.make(max_batch_size=1, max_positions=1000, chunk=64)
    assert b.cache_length(1) == 128
    assert b.cache_length(128) == 128
    assert b.cache_length(129) == 256
    assert b.cache_length(1000) == 1000
    with pytest.raises(ValueError, match="1001 positions"):
        b.cache_length(1001)


def test_shapes_keep_every_batch_times_cache_length_within_max_cache_tokens() -> None:
    b = Buckets.make(max_batch_size=8, max_positions=2048, chunk=64, max_cache_tokens=4096)
    shapes = b.shapes()
    assert all(batch * length <= 4096 for batch, length in shapes)
    assert (1, 2048) in shapes and (2, 2048) in shapes and (8, 512) in shapes
    assert (4, 2048) not in shapes and (8, 1024) not in shapes
    assert len(shapes) == len(set(shapes))
    assert {length for _, length in shapes} == set(b.cache_lengths)  # every length serves at least one row
    assert b.max_rows(2048) == 2 and b.max_rows(512) == 8


def test_positions_needed_covers_prompt_plus_output_and_the_whole_last_chunk() -> None:
    assert Request(tokens=(1,) * 5, max_new_tokens=3).positions_needed(chunk=4) == 8
    assert Request(tokens=(1,) * 5, max_new_tokens=20).positions_needed(chunk=4) == 25
    assert Request(tokens=(1,) * 5, max_new_tokens=1).positions_needed(chunk=16) == 16
    assert Request(tokens=(1,) * 16, max_new_tokens=1).positions_needed(chunk=16) == 17


def test_plan_batches_places_every_request_once_within_the_row_and_kv_limits() -> None:
    buckets = Buckets.make(max_batch_size=4, max_positions=1024, chunk=32, max_cache_tokens=2048)
    rng = np.random.default_rng(0)
    requests = [Request(tokens=(1,) * int(rng.integers(1, 500)), max_new_tokens=int(rng.integers(1, 500)))
                for _ in range(40)]
    groups = plan_batches(requests, buckets)
    assert sorted(i for g in groups for i in g) == list(range(len(requests)))
    for group in groups:
        length = buckets.cache_length(max(requests[i].positions_needed(buckets.chunk) for i in group))
        assert 1 <= len(group) <= buckets.max_rows(length) <= 4
        assert buckets.batch_size(len(group)) * length <= buckets.max_cache_tokens
    assert any(len(g) == 4 for g in groups) and any(len(g) < 4 for g in groups)  # both limits were reached


def test_plan_batches_groups_short_requests_apart_from_long_ones() -> None:
    buckets = Buckets.make(max_batch_size=4, max_positions=1024, chunk=32, max_cache_tokens=1024)
    short, long = Request((1,) * 10, 10), Request((1,) * 600, 10)
    groups = plan_batches([long, short, long, short, short], buckets)
    assert groups == [[1, 3, 4], [0], [2]]  # 1024 positions fit one row; 128 fit four


# ---------------------------------------------------------------------------------------------------
# The Generator, first with the fake model (answers known by hand), then with random/tiny
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NextTokenLM:
    """What Generator needs of a model: `apply`, `config`, `dtype`; the cache passes through untouched."""

    config: OPTConfig
    dtype: Any = jnp.float32

    def apply(self, variables: Any, tokens: jax.Array, cache: KVCache, start: jax.Array, last: jax.Array):
        return next_token_model(variables, tokens, cache, start, last)[0], cache


def test_generator_with_a_fake_model_stops_at_eos_or_max_new_tokens_whichever_comes_first() -> None:
    config = OPTConfig(vocab_size=V, hidden_size=4, num_attention_heads=1, num_hidden_layers=1, ffn_dim=4,
                       word_embed_proj_dim=4, max_position_embeddings=64, eos_token_id=EOS)
    mesh = opt_utils.make_mesh(jax.devices()[:1], config)
    buckets = Buckets.make(max_batch_size=4, max_positions=64, chunk=8)
    generator = Generator(model=NextTokenLM(config), params={"unused": jnp.zeros(1)}, mesh=mesh, buckets=buckets)
    generator.warm_up([(1, 64), (4, 64)])
    requests = [
        Request(tokens=(5, 7), max_new_tokens=4),  # stops at its length
        Request(tokens=(9, 0), max_new_tokens=3),  # 1 then EOS: EOS is not returned
        Request(tokens=(3,), max_new_tokens=20),  # counts up, wraps past 15, stops at EOS
        Request(tokens=tuple(range(3, 13)), max_new_tokens=1),  # a two-chunk prompt, one token
        Request(tokens=(EOS - 1,), max_new_tokens=5),  # EOS straight from the prefill: nothing; a 5th row
    ]
    result = generator.generate(requests)
    assert result.tokens == [[8, 9, 10, 11], [1], [*range(4, 16), 0, 1], [13], []]


@pytest.fixture(scope="module")
def tiny() -> Generator:
    """random/tiny with 64 positions, float32, random weights, warmed up for batches of 1 and 4 only."""
    config = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=64)
    model = OPTForCausalLM(config, jnp.float32)
    mesh = opt_utils.make_mesh(jax.devices()[:1], config)
    # Weights of std 0.2 (LayerNorm scales about 1), ten times OPT's init, so that greedy output varies
    # instead of repeating one token; drawn by numpy, as compiling jax's random init costs seconds.
    rng = np.random.default_rng(0)
    draw = lambda path, a: rng.normal(1.0 if path_name(path).endswith("scale") else 0.0, 0.2, a.shape)
    abstract = opt_utils.abstract_params(model)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a, sharding: jax.device_put(draw(path, a).astype(np.float32), sharding),
        abstract, opt_utils.param_shardings(abstract, mesh))
    generator = Generator(model=model, params=params, mesh=mesh,
                          buckets=Buckets.make(max_batch_size=4, max_positions=64, chunk=16))
    assert generator.buckets.cache_lengths == (64,)
    generator.warm_up([(1, 64), (4, 64)])
    return generator


# Prompt lengths 3, 17, 30 and 16: one chunk, two chunks (one or 15 tokens in the second), exactly one.
MIXED = [
    Request(tokens=tuple(range(100, 103)), max_new_tokens=7),
    Request(tokens=tuple(range(200, 217)), max_new_tokens=12),
    Request(tokens=tuple(range(300, 330)), max_new_tokens=2),
    Request(tokens=tuple(range(400, 416)), max_new_tokens=1),
]


def naive_greedy(generator: Generator, forward: Any, request: Request) -> list[int]:
    """Greedy tokens by full forward passes over the whole sequence each time, with no cache to reuse."""
    cfg = generator.config
    width = cfg.max_position_embeddings
    sequence, out = list(request.tokens), []
    for _ in range(request.max_new_tokens):
        padded = np.full((1, width), cfg.pad_token_id, np.int32)  # causal: padding after `last` changes nothing
        padded[0, : len(sequence)] = sequence
        token = int(np.argmax(forward(generator.params, padded, np.asarray([len(sequence) - 1], np.int32))[0]))
        if token == cfg.eos_token_id:
            break
        out.append(token)
        sequence.append(token)
    return out


def test_tiny_model_greedy_generation_equals_naive_full_forward_passes(tiny: Generator) -> None:
    cfg = tiny.config
    # An empty cache (start 0, one slot that nothing reads) makes each call a plain full forward pass.
    forward = jax.jit(lambda p, t, last: tiny.model.apply(
        {"params": p}, t, KVCache.zeros(cfg, 1, 1, jnp.float32), jnp.zeros((1,), jnp.int32), last)[0])
    result = tiny.generate(MIXED)
    expected = [naive_greedy(tiny, forward, r) for r in MIXED]
    assert len(set(t for row in expected for t in row)) > 5  # the model says varied things, not one token over
    assert result.tokens == expected


def test_tiny_model_rows_of_a_mixed_batch_equal_each_row_generated_alone(tiny: Generator) -> None:
    together = tiny.generate(MIXED).tokens
    alone = [tiny.generate([r]).tokens[0] for r in MIXED]
    assert together == alone
    assert [len(row) for row in together] == [r.max_new_tokens for r in MIXED]  # random/tiny never says EOS here


def test_generation_of_a_shape_that_was_not_warmed_up_is_an_error_not_a_compile(tiny: Generator) -> None:
    programs = dict(tiny._programs)
    with pytest.raises(RuntimeError, match="not warmed up"):
        tiny.generate(MIXED[:2])  # two rows: the batch-2 bucket was never compiled
    assert tiny._programs == programs
