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


def next_token_model(params: Any, tokens: jax.Array, cache: Any, column: jax.Array, first_valid: jax.Array):
    """Logits peaking at (tokens[:, -1] + 1) % V; the "cache" it returns is the (column, first_valid) it was called with."""
    return jax.nn.one_hot((tokens[:, -1] + 1) % V, V), (column, first_valid)


def i32(*values: int) -> jax.Array:
    return jnp.asarray(values, jnp.int32)


def state(tokens, column, first_valid, remaining, done) -> DecodeState:
    return DecodeState(tokens=i32(*tokens), column=jnp.int32(column), first_valid=i32(*first_valid),
                       remaining=i32(*remaining), done=jnp.asarray(done, bool))


def test_prefill_chunk_runs_the_chunk_at_its_column_and_gives_every_row_the_token_after_its_last() -> None:
    # A chunk of 4 at column 4 (columns 4..7) of left-padded prompts of 3, 6 and 9 tokens in 12 columns:
    # row 0 is still all padding here, row 1 starts inside the chunk, row 2 started in the chunk before.
    tokens = jnp.asarray([[1, 1, 1, 1], [1, 1, 7, 9], [3, 4, 5, 6]], jnp.int32)
    (column, first_valid), first = prefill_chunk(next_token_model, None, None, tokens, jnp.int32(4), i32(9, 6, 3))
    assert int(column) == 4  # every row's chunk goes to the same columns
    np.testing.assert_array_equal(first_valid, [9, 6, 3])  # each row's padding is passed on as it is
    np.testing.assert_array_equal(first, [2, 10, 7])  # from each row's last token; row 0's is never read


def test_prefill_chunk_reads_the_last_column_of_the_chunk() -> None:
    tokens = jnp.asarray([[1, 1, 7, 8], [5, 6, 7, 14]], jnp.int32)
    _, first = prefill_chunk(next_token_model, None, None, tokens, jnp.int32(0), i32(2, 0))
    np.testing.assert_array_equal(first, [9, 15])


def test_decode_step_advances_unfinished_rows_by_one_token_and_every_row_by_one_column() -> None:
    (column, first_valid), after = decode_step(
        next_token_model, None, None, state([5, 9], 7, [4, 0], [4, 4], [False, False]), EOS)
    assert int(column) == 7  # both rows' tokens go to the state's column
    np.testing.assert_array_equal(first_valid, [4, 0])
    np.testing.assert_array_equal(after.tokens, [6, 10])
    assert int(after.column) == 8
    np.testing.assert_array_equal(after.first_valid, [4, 0])  # padding never changes
    np.testing.assert_array_equal(after.remaining, [3, 3])
    np.testing.assert_array_equal(after.done, [False, False])


def test_decode_step_stops_a_row_that_produces_eos() -> None:
    _, after = decode_step(next_token_model, None, None, state([EOS - 1, 5], 3, [0, 0], [4, 4], [False, False]), EOS)
    np.testing.assert_array_equal(after.tokens, [EOS, 6])
    np.testing.assert_array_equal(after.done, [True, False])


def test_decode_step_stops_a_row_that_used_up_its_remaining_tokens() -> None:
    _, after = decode_step(next_token_model, None, None, state([5, 5], 3, [0, 0], [1, 2], [False, False]), EOS)
    np.testing.assert_array_equal(after.tokens, [6, 6])  # the last allowed token is still produced
    np.testing.assert_array_equal(after.remaining, [0, 1])
    np.testing.assert_array_equal(after.done, [True, False])


def test_decode_step_freezes_finished_rows() -> None:
    before = state([EOS, 5], 6, [3, 1], [2, 2], [True, False])
    s = before
    for _ in range(3):
        _, s = decode_step(next_token_model, None, None, s, EOS)
    # The live row made 6 then 7, ran out of tokens, and from then on stayed as the finished row did:
    # tokens and counts frozen, only the shared column moves on (what finished rows write is never read).
    np.testing.assert_array_equal(s.tokens, [EOS, 7])
    assert int(s.column) == 9
    np.testing.assert_array_equal(s.first_valid, [3, 1])
    np.testing.assert_array_equal(s.remaining, [2, 0])
    np.testing.assert_array_equal(s.done, [True, True])


# ---------------------------------------------------------------------------------------------------
# Buckets, requests and batch plans
# ---------------------------------------------------------------------------------------------------


def test_buckets_make_powers_of_two_below_the_position_limit_then_the_limit_plus_a_chunk() -> None:
    b = Buckets.make(max_batch_size=6, max_positions=2048, chunk=64)
    assert b.batch_sizes == (1, 2, 4, 6)
    assert b.cache_lengths == (128, 256, 512, 1024, 2048 + 64)
    assert b.chunk == 64


def test_buckets_make_ends_at_a_position_limit_that_is_no_power_of_two_and_never_below_the_chunk() -> None:
    b = Buckets.make(max_batch_size=1, max_positions=300, chunk=100)
    assert b.batch_sizes == (1,)
    assert b.cache_lengths == (128, 256, 400)
    assert Buckets.make(max_batch_size=1, max_positions=1000, chunk=200).cache_lengths == (256, 512, 1200)
    small = Buckets.make(max_batch_size=1, max_positions=40, chunk=64)
    assert small.chunk == 40 and small.cache_lengths == (80,)


def test_buckets_make_rejects_a_kv_budget_below_one_full_length_sequence() -> None:
    with pytest.raises(ValueError, match="max_cache_tokens"):
        Buckets.make(max_batch_size=4, max_positions=2048, max_cache_tokens=1024)
    # A full-length sequence is the position limit plus a chunk of padding.
    with pytest.raises(ValueError, match="max_cache_tokens"):
        Buckets.make(max_batch_size=1, max_positions=2048, chunk=64, max_cache_tokens=2048 + 63)
    assert Buckets.make(max_batch_size=1, max_positions=2048, chunk=64, max_cache_tokens=2048 + 64).shapes() == [
        (1, 128), (1, 256), (1, 512), (1, 1024), (1, 2048 + 64)]


def test_cache_length_is_the_smallest_bucket_holding_the_columns() -> None:
    b = Buckets.make(max_batch_size=1, max_positions=1000, chunk=64)
    assert b.cache_lengths == (128, 256, 512, 1064)
    assert b.cache_length(1) == 128
    assert b.cache_length(128) == 128
    assert b.cache_length(129) == 256
    assert b.cache_length(1000) == 1064
    assert b.cache_length(1064) == 1064
    with pytest.raises(ValueError, match="1065 cache columns"):
        b.cache_length(1065)


def test_shapes_keep_every_batch_times_cache_length_within_max_cache_tokens() -> None:
    b = Buckets.make(max_batch_size=8, max_positions=2048, chunk=64, max_cache_tokens=2 * 2112)
    shapes = b.shapes()
    assert all(batch * length <= 2 * 2112 for batch, length in shapes)
    assert (1, 2112) in shapes and (2, 2112) in shapes and (8, 512) in shapes
    assert (4, 2112) not in shapes and (8, 1024) not in shapes
    assert len(shapes) == len(set(shapes))
    assert {length for _, length in shapes} == set(b.cache_lengths)  # every length serves at least one row
    assert b.max_rows(2112) == 2 and b.max_rows(512) == 8


def test_columns_needed_covers_the_prompt_padded_to_whole_chunks_plus_every_token_fed_back() -> None:
    b = Buckets.make(max_batch_size=4, max_positions=64, chunk=4)
    columns = lambda *requests: (b.padded_prompt(requests), b.columns_needed(requests))
    assert columns(Request(tokens=(1,) * 5, max_new_tokens=3)) == (8, 10)
    assert columns(Request(tokens=(1,) * 5, max_new_tokens=20)) == (8, 27)
    assert columns(Request(tokens=(1,) * 4, max_new_tokens=1)) == (4, 4)  # the one token is never fed back
    b16 = Buckets.make(max_batch_size=4, max_positions=64, chunk=16)
    assert b16.padded_prompt([Request(tokens=(1,) * 5, max_new_tokens=1)]) == 16
    assert b16.columns_needed([Request(tokens=(1,) * 16, max_new_tokens=1)]) == 16
    assert b16.columns_needed([Request(tokens=(1,) * 17, max_new_tokens=2)]) == 33
    # A batch needs its longest prompt and its longest output, even when they are different requests.
    assert columns(Request((1,) * 9, 1), Request((1,) * 2, 10), Request((1,) * 5, 3)) == (12, 21)


def test_plan_batches_places_every_request_once_within_the_row_and_kv_limits() -> None:
    buckets = Buckets.make(max_batch_size=4, max_positions=1024, chunk=32, max_cache_tokens=2 * 1056)
    rng = np.random.default_rng(0)
    requests = [Request(tokens=(1,) * int(rng.integers(1, 500)), max_new_tokens=int(rng.integers(1, 500)))
                for _ in range(40)]
    groups = plan_batches(requests, buckets)
    assert sorted(i for g in groups for i in g) == list(range(len(requests)))
    for group in groups:
        length = buckets.cache_length(buckets.columns_needed([requests[i] for i in group]))
        assert 1 <= len(group) <= buckets.max_rows(length) <= 4
        assert buckets.batch_size(len(group)) * length <= buckets.max_cache_tokens
    assert any(len(g) == 4 for g in groups) and any(len(g) < 4 for g in groups)  # both limits were reached


def test_plan_batches_groups_short_requests_apart_from_long_ones() -> None:
    buckets = Buckets.make(max_batch_size=4, max_positions=1024, chunk=32, max_cache_tokens=1056)
    short, long = Request((1,) * 10, 10), Request((1,) * 600, 10)
    groups = plan_batches([long, short, long, short, short], buckets)
    assert groups == [[1, 3, 4], [0], [2]]  # 1056 columns fit one row; 128 fit four


def test_plan_batches_keeps_apart_a_long_prompt_and_a_long_output_that_fit_only_alone() -> None:
    # Each fits the largest cache (1056 columns) alone; together they would need 1024 + 999 columns.
    buckets = Buckets.make(max_batch_size=4, max_positions=1024, chunk=32, max_cache_tokens=4 * 1056)
    long_prompt, long_output, short = Request((1,) * 1000, 1), Request((1,), 1000), Request((1,), 5)
    requests = [long_prompt, long_output, short]
    groups = plan_batches(requests, buckets)
    assert groups == [[2, 0], [1]]
    for group in groups:
        assert buckets.columns_needed([requests[i] for i in group]) <= buckets.cache_lengths[-1]


# ---------------------------------------------------------------------------------------------------
# The Generator, first with the fake model (answers known by hand), then with random/tiny
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NextTokenLM:
    """What Generator needs of a model: `apply`, `config`, `dtype`; the cache passes through untouched."""

    config: OPTConfig
    dtype: Any = jnp.float32

    def apply(self, variables: Any, tokens: jax.Array, cache: KVCache, column: jax.Array, first_valid: jax.Array):
        return next_token_model(variables, tokens, cache, column, first_valid)[0], cache


def test_generator_with_a_fake_model_stops_at_eos_or_max_new_tokens_whichever_comes_first() -> None:
    config = OPTConfig(vocab_size=V, hidden_size=4, num_attention_heads=1, num_hidden_layers=1, ffn_dim=4,
                       word_embed_proj_dim=4, max_position_embeddings=64, eos_token_id=EOS)
    mesh = opt_utils.make_mesh(jax.devices()[:1], config)
    buckets = Buckets.make(max_batch_size=4, max_positions=64, chunk=8)
    assert buckets.cache_lengths == (72,)
    generator = Generator(model=NextTokenLM(config), params={"unused": jnp.zeros(1)}, mesh=mesh, buckets=buckets)
    generator.warm_up([(1, 72), (4, 72)])
    requests = [
        Request(tokens=(5, 7), max_new_tokens=4),  # stops at its length
        Request(tokens=(9, 0), max_new_tokens=3),  # 1 then EOS: EOS is not returned
        Request(tokens=(3,), max_new_tokens=20),  # counts up, wraps past 15, stops at EOS
        Request(tokens=tuple(range(3, 13)), max_new_tokens=1),  # a two-chunk prompt (the others: padding), one token
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
    assert generator.buckets.cache_lengths == (80,)
    generator.warm_up([(1, 80), (4, 80)])
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
        padded = np.full((1, width), cfg.pad_token_id, np.int32)  # left-padded: the newest token is last
        padded[0, width - len(sequence) :] = sequence
        token = int(np.argmax(forward(generator.params, padded, np.asarray([width - len(sequence)], np.int32))[0]))
        if token == cfg.eos_token_id:
            break
        out.append(token)
        sequence.append(token)
    return out


@pytest.fixture(scope="module")
def forward(tiny: Generator) -> Any:
    """(params, tokens [1, W], first_valid [1]) -> logits of the last token, W = the model's positions."""
    cfg = tiny.config
    width = cfg.max_position_embeddings
    # A fresh cache exactly as wide as the tokens, written from column 0: each call is a plain full forward pass.
    return jax.jit(lambda p, t, first_valid: tiny.model.apply(
        {"params": p}, t, KVCache.zeros(cfg, 1, width, jnp.float32), jnp.int32(0), first_valid)[0])


def test_tiny_model_greedy_generation_equals_naive_full_forward_passes(tiny: Generator, forward: Any) -> None:
    result = tiny.generate(MIXED)
    expected = [naive_greedy(tiny, forward, r) for r in MIXED]
    assert len(set(t for row in expected for t in row)) > 5  # the model says varied things, not one token over
    assert result.tokens == expected


def test_tiny_model_generation_up_to_the_last_position_equals_naive_full_forward_passes(tiny: Generator, forward: Any) -> None:
    # 49 + 16 tokens: the last one fed back sits at position 63, the model's last, and at cache column
    # 64 + 15 - 1 = 78 of 80 (the prompt padded to 64 columns).
    request = Request(tokens=tuple(range(500, 549)), max_new_tokens=16)
    assert tiny.buckets.columns_needed([request]) == 79
    expected = naive_greedy(tiny, forward, request)
    assert len(expected) == request.max_new_tokens  # no EOS: every position is reached
    assert tiny.generate([request]).tokens == [expected]


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
