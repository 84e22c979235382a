"""The generation phases with a fake model known by hand, the slot shapes, sampling, and the scheduler end to
end with the fake model (random/tiny against naive forward passes is in test_engine.py)."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import Scheduler
from modeling_flax_opt import KVCache, OPTConfig
from plan import Request, Sampling, SlotShapes, split_seed
from runner import SlotRunner
from sharding import make_mesh
from slots import (Admissions, SlotState, admit, decode_first_rows, decode_step, filter_logits, greedy, prefill_chunk,
                   sample, shift_columns)

# ---------------------------------------------------------------------------------------------------
# A fake model: the next token is the token asked about plus one
# ---------------------------------------------------------------------------------------------------

V = 16  # the fake's vocabulary
EOS = 2


def next_token_model(params: Any, tokens: jax.Array, cache: Any, column: jax.Array, first_valid: jax.Array,
                     window: int | None):
    """Logits peaking at (tokens[:, -1] + 1) % V; the "cache" it returns is what it was called with."""
    return jax.nn.one_hot((tokens[:, -1] + 1) % V, V), (column, first_valid, window)


def i32(*values: int) -> jax.Array:
    return jnp.asarray(values, jnp.int32)


def slot_state(tokens, column, first_valid, remaining, done, ignore_eos=None) -> SlotState:
    """Greedy slots: [S] each from the lists given, `generated` 1 everywhere."""
    S = len(tokens)
    return SlotState.empty(S, column).replace(
        tokens=i32(*tokens), first_valid=i32(*first_valid), generated=jnp.ones((S,), jnp.int32),
        remaining=i32(*remaining), done=jnp.asarray(done, bool),
        ignore_eos=jnp.asarray(ignore_eos if ignore_eos is not None else [False] * S, bool))


def step(state: SlotState, window: int | None = None) -> tuple[Any, SlotState]:
    return decode_step(next_token_model, None, None, state, EOS, window, False)


def test_prefill_chunk_runs_the_chunk_at_its_column_and_gives_every_row_the_logits_after_its_last_token() -> None:
    # A chunk of 4 at column 4 (columns 4..7) of left-padded prompts of 3, 6 and 9 tokens in 12 columns:
    # row 0 is still all padding here, row 1 starts inside the chunk, row 2 started in the chunk before.
    tokens = jnp.asarray([[1, 1, 1, 1], [1, 1, 7, 9], [3, 4, 5, 6]], jnp.int32)
    (column, first_valid, window), logits = prefill_chunk(next_token_model, None, None, tokens, jnp.int32(4),
                                                          i32(9, 6, 3))
    assert int(column) == 4  # every row's chunk goes to the same columns
    np.testing.assert_array_equal(first_valid, [9, 6, 3])  # each row's padding is passed on as it is
    assert window is None  # a prefill attends over its whole prompt cache
    assert logits.shape == (3, V)
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), [2, 10, 7])  # row 0's is never read


def test_decode_step_advances_live_slots_by_one_token_and_the_common_column_by_one() -> None:
    (column, first_valid, window), after = step(slot_state([5, 9], 7, [4, 0], [4, 4], [False, False]), window=64)
    assert int(column) == 7 and window == 64  # both slots' tokens go to the state's column, over the window
    np.testing.assert_array_equal(first_valid, [4, 0])
    np.testing.assert_array_equal(after.tokens, [6, 10])
    assert int(after.column) == 8
    np.testing.assert_array_equal(after.first_valid, [4, 0])  # a slot's first column never moves here
    np.testing.assert_array_equal(after.generated, [2, 2])
    np.testing.assert_array_equal(after.remaining, [3, 3])
    np.testing.assert_array_equal(after.done, [False, False])


def test_decoding_the_first_rows_leaves_the_other_slots_as_they_were() -> None:
    cache = KVCache(k=(jnp.arange(4.0).reshape(4, 1, 1, 1),), v=(jnp.zeros((4, 1, 1, 1)),))
    before = slot_state([5, 9, 11, 3], 7, [4, 0, 1, 2], [4, 4, 4, 4], [False] * 4)
    (column, first_valid, window), after = decode_first_rows(
        lambda p, t, c, col, fv, w: next_token_model(p, t, c, col, fv, w) if c.k[0].shape[0] == 2 else None,
        None, cache, before, EOS, 64, 2, False)
    np.testing.assert_array_equal(first_valid, [4, 0])  # the model saw slots 0 and 1 only
    np.testing.assert_array_equal(after.tokens, [6, 10, 11, 3])
    np.testing.assert_array_equal(after.generated, [2, 2, 1, 1])
    np.testing.assert_array_equal(after.remaining, [3, 3, 4, 4])
    assert int(after.column) == 8  # the common column advances for every slot


def test_decode_step_stops_a_slot_that_produces_eos_unless_it_ignores_eos() -> None:
    _, after = step(slot_state([EOS - 1, 5, EOS - 1], 3, [0, 0, 0], [4, 4, 4], [False] * 3, [False, False, True]))
    np.testing.assert_array_equal(after.tokens, [EOS, 6, EOS])
    np.testing.assert_array_equal(after.done, [True, False, False])
    np.testing.assert_array_equal(after.remaining, [3, 3, 3])


def test_decode_step_stops_a_slot_that_used_up_its_budget_even_when_it_ignores_eos() -> None:
    _, after = step(slot_state([5, 5, 5], 3, [0, 0, 0], [1, 2, 1], [False] * 3, [False, False, True]))
    np.testing.assert_array_equal(after.tokens, [6, 6, 6])  # the last allowed token is still produced
    np.testing.assert_array_equal(after.remaining, [0, 1, 0])
    np.testing.assert_array_equal(after.done, [True, False, True])


def test_decode_step_freezes_finished_slots() -> None:
    s = slot_state([EOS, 5], 6, [3, 1], [2, 2], [True, False])
    for _ in range(3):
        _, s = step(s)
    # The live slot made 6 then 7, ran out of tokens, and from then on stayed as the finished one did:
    # tokens and counts frozen, only the shared column moves on (what finished slots write is never read).
    np.testing.assert_array_equal(s.tokens, [EOS, 7])
    assert int(s.column) == 9
    np.testing.assert_array_equal(s.first_valid, [3, 1])
    np.testing.assert_array_equal(s.generated, [1, 3])
    np.testing.assert_array_equal(s.remaining, [2, 0])
    np.testing.assert_array_equal(s.done, [True, True])


# -- admit: prefilled rows into their slots ---------------------------------------------------------

S, C, P = 3, 10, 4  # slots, cache columns, prompt bucket


def column_cache(rows: int, columns: int, base: float) -> KVCache:
    """One layer of [rows, 1 head, columns, 1]: k = base + 10 * row + column, v = -k."""
    k = base + 10.0 * np.arange(rows)[:, None] + np.arange(columns)[None, :]
    k = jnp.asarray(k[:, None, :, None], jnp.float32)
    return KVCache(k=(k,), v=(-k,))


def admissions(slot, length, budget, valid, ignore_eos=None, temperature=None) -> Admissions:
    b = len(slot)
    return Admissions(slot=i32(*slot), length=i32(*length), budget=i32(*budget),
                      temperature=jnp.asarray(temperature or [0.0] * b, jnp.float32),
                      top_k=i32(*range(1, b + 1)), top_p=jnp.linspace(0.5, 0.9, b, dtype=jnp.float32),
                      seed=jnp.asarray([split_seed(7 + 2**40 * i) for i in range(b)], jnp.uint32),
                      ignore_eos=jnp.asarray(ignore_eos or [False] * b, bool), valid=jnp.asarray(valid, bool))


def admit_rows(rows: Admissions, next_tokens: list[int], t: int = 6) -> tuple[KVCache, SlotState, jax.Array]:
    """Admits prompt rows (k = 100 + 10 * row + column) into the slots (k = -100 + 10 * slot + column) at t."""
    cache, prompts = column_cache(S, C, -100.0), column_cache(len(next_tokens), P, 100.0)
    logits = jax.nn.one_hot(i32(*next_tokens), V)
    state = slot_state([1, 1, 1], t, [0, 0, 0], [5, 5, 5], [True, True, True])
    return admit(cache, state, prompts, logits, rows, EOS, False)


def test_admit_places_the_prompt_columns_so_that_the_last_prompt_token_sits_just_before_t() -> None:
    # [b=2, P=4] prompts; row 0 (3 real tokens) goes to slot 2, row 1 (4 tokens) to slot 0; t = 6.
    cache, state, first = admit_rows(admissions([2, 0], [3, 4], [5, 7], [True, True]), [9, 12])
    k = np.asarray(cache.k[0])[:, 0, :, 0]  # [S, C]
    np.testing.assert_array_equal(k[2, 2:6], 100.0 + np.arange(4))  # prompt columns 0..3 -> t-4..t-1
    np.testing.assert_array_equal(k[0, 2:6], 110.0 + np.arange(4))
    np.testing.assert_array_equal(np.asarray(cache.v[0])[:, 0, 2:6, 0], -k[:, 2:6])
    untouched = column_cache(S, C, -100.0).k[0][:, 0, :, 0]
    np.testing.assert_array_equal(k[1], untouched[1])  # a slot nobody was admitted to
    np.testing.assert_array_equal(k[:, :2], untouched[:, :2])  # columns outside t-P..t-1
    np.testing.assert_array_equal(k[:, 6:], untouched[:, 6:])
    np.testing.assert_array_equal(first, [9, 12])
    np.testing.assert_array_equal(state.tokens, [12, 1, 9])
    np.testing.assert_array_equal(state.first_valid, [6 - 4, 0, 6 - 3])  # t - prompt length
    np.testing.assert_array_equal(state.generated, [1, 1, 1])
    np.testing.assert_array_equal(state.remaining, [6, 5, 4])  # budget - the first token
    np.testing.assert_array_equal(state.done, [False, True, False])  # slot 1 stays empty
    np.testing.assert_array_equal(state.top_k, [2, 0, 1])  # each row's sampling settings follow it
    np.testing.assert_allclose(state.top_p, [0.9, 1.0, 0.5])
    np.testing.assert_array_equal(state.seed, [split_seed(7 + 2**40), [0, 0], split_seed(7)])
    assert int(state.column) == 6  # admitting moves no column


def test_admit_finishes_a_row_whose_first_token_is_eos_unless_it_ignores_eos_and_one_whose_budget_is_one() -> None:
    rows = admissions([0, 1, 2], [1, 1, 1], [5, 5, 1], [True] * 3, ignore_eos=[False, True, False])
    _, state, first = admit_rows(rows, [EOS, EOS, 7])
    np.testing.assert_array_equal(first, [EOS, EOS, 7])
    np.testing.assert_array_equal(state.done, [True, False, True])
    np.testing.assert_array_equal(state.remaining, [4, 4, 0])
    np.testing.assert_array_equal(state.ignore_eos, [False, True, False])


def test_admit_rows_that_are_not_valid_change_nothing() -> None:
    # Row 1 pads the group to a compiled row count: it names slot 0 (a default) but must not touch it.
    cache, state, _ = admit_rows(admissions([2, 0], [3, 1], [5, 5], [True, False]), [9, 12])
    k = np.asarray(cache.k[0])[:, 0, :, 0]
    np.testing.assert_array_equal(k[:2], column_cache(S, C, -100.0).k[0][:2, 0, :, 0])
    np.testing.assert_array_equal(state.tokens, [1, 1, 9])
    np.testing.assert_array_equal(state.first_valid, [0, 0, 3])
    np.testing.assert_array_equal(state.done, [True, True, False])


def test_admit_samples_the_first_token_with_index_zero_of_the_rows_seed() -> None:
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1, (2, V)), jnp.float32)
    rows = admissions([0, 1], [1, 1], [5, 5], [True, True], temperature=[1.0, 1.0])
    state = slot_state([1, 1, 1], 6, [0, 0, 0], [5, 5, 5], [True] * 3)
    _, _, first = admit(column_cache(S, C, 0.0), state, column_cache(2, P, 0.0), logits, rows, EOS, True)
    expected = sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, i32(0, 0), True)
    np.testing.assert_array_equal(first, expected)


# -- shift_columns -------------------------------------------------------------------------------------


def test_shift_columns_moves_every_column_t_and_first_columns_to_the_left() -> None:
    state = slot_state([1, 1, 1], 8, [5, 3, 7], [1, 1, 1], [False] * 3)
    cache, after = shift_columns(column_cache(S, C, 0.0), state, jnp.int32(3))
    k = np.asarray(cache.k[0])[:, 0, :, 0]
    np.testing.assert_array_equal(k[:, : C - 3], column_cache(S, C, 3.0).k[0][:, 0, : C - 3, 0])  # column c+3 -> c
    np.testing.assert_array_equal(np.asarray(cache.v[0])[:, 0, :, 0], -k)
    assert int(after.column) == 5
    np.testing.assert_array_equal(after.first_valid, [2, 0, 4])
    np.testing.assert_array_equal(after.tokens, state.tokens)


def test_shift_columns_by_a_negative_count_moves_them_to_the_right() -> None:
    state = slot_state([1, 1, 1], 2, [1, 0, 2], [1, 1, 1], [False] * 3)
    cache, after = shift_columns(column_cache(S, C, 0.0), state, jnp.int32(-4))
    k = np.asarray(cache.k[0])[:, 0, :, 0]
    np.testing.assert_array_equal(k[:, 4:], column_cache(S, C, 0.0).k[0][:, 0, : C - 4, 0])  # column c -> c+4
    assert int(after.column) == 6
    np.testing.assert_array_equal(after.first_valid, [5, 4, 6])


# ---------------------------------------------------------------------------------------------------
# Shapes and requests
# ---------------------------------------------------------------------------------------------------


def test_slot_shapes_for_opt_positions_double_prompt_buckets_and_windows_up_to_the_positions() -> None:
    s = SlotShapes.make(slots=6, max_positions=2048, chunk=64, prefill_tokens=4096)
    assert s.prompt_buckets == (64, 128, 256, 512, 1024, 2048)
    assert s.windows == (128, 256, 512, 1024, 2048)
    assert s.columns == 3072  # 1.5 x the positions: at least 1024 steps between left shifts
    assert (s.slots, s.max_positions, s.chunk, s.prefill_tokens) == (6, 2048, 64, 4096)


def test_slot_shapes_end_at_positions_that_are_no_power_of_two_and_never_use_a_chunk_above_them() -> None:
    s = SlotShapes.make(slots=1, max_positions=300, chunk=100)
    assert s.prompt_buckets == (100, 200, 300)  # a 299-token prompt leaves room for one new token
    assert s.windows == (128, 256, 300)
    assert s.columns == 450
    small = SlotShapes.make(slots=1, max_positions=40, chunk=64)
    assert (small.chunk, small.prompt_buckets, small.windows, small.columns) == (40, (40,), (40,), 60)


def test_prefill_rows_are_powers_of_two_up_to_the_slots_and_the_token_bound() -> None:
    s = SlotShapes.make(slots=6, max_positions=2048, chunk=64, prefill_tokens=4096)
    assert s.prefill_rows(64) == (1, 2, 4, 6)  # capped by the slots, the last one the slots themselves
    assert s.prefill_rows(1024) == (1, 2, 4)  # 4 x 1024 tokens
    assert s.prefill_rows(2048) == (1, 2)
    shapes = s.prefill_shapes()
    assert all(rows * bucket <= 4096 for rows, bucket in shapes)
    assert len(shapes) == len(set(shapes)) and {bucket for _, bucket in shapes} == set(s.prompt_buckets)
    assert s.prefill_batch(3, 64) == 4 and s.prefill_batch(5, 64) == 6 and s.prefill_batch(1, 2048) == 1


def test_the_prefill_token_bound_never_goes_below_one_row_of_the_longest_bucket() -> None:
    s = SlotShapes.make(slots=4, max_positions=64, chunk=16, prefill_tokens=10)
    assert s.prefill_tokens == 64
    assert s.prefill_rows(64) == (1,) and s.prefill_rows(16) == (1, 2, 4)


def test_prompt_bucket_and_window_are_the_smallest_that_hold_the_length() -> None:
    s = SlotShapes.make(slots=2, max_positions=300, chunk=100)
    assert [s.prompt_bucket(n) for n in (1, 100, 101, 299)] == [100, 100, 200, 300]
    assert [s.window(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 300]
    with pytest.raises(ValueError, match="301 tokens exceeds the longest prompt bucket 300"):
        s.prompt_bucket(301)
    with pytest.raises(ValueError, match="301 live columns exceed the largest window 300"):
        s.window(301)


def test_slot_shapes_need_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one decode slot"):
        SlotShapes.make(slots=0, max_positions=64)


@pytest.mark.parametrize("positions, chunk", [(2048, 64), (64, 16), (300, 100), (100, 64), (100, 80)])
def test_the_cache_has_a_column_for_the_token_after_the_longest_prompt_bucket(positions: int, chunk: int) -> None:
    # A prompt of the longest bucket P arriving at t < P rolls the cache right to t = P, and the decode
    # step then writes column P: with C == P that write is clamped onto column P - 1 (the prompt's last
    # token). SlotShapes.make(max_positions=100, chunk=80) has buckets (80, 160) and C = 160.
    s = SlotShapes.make(slots=1, max_positions=positions, chunk=chunk)
    assert s.columns > s.prompt_buckets[-1]


def test_a_request_needs_a_prompt_token_and_a_new_token() -> None:
    with pytest.raises(ValueError, match="prompt token"):
        Request(tokens=(), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        Request(tokens=(1,), max_new_tokens=0)
    assert Request((1,), 1).sampling.greedy and not Sampling(temperature=0.5).greedy


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

# Ranked 1, 3, 4, 0, 2; softmax at temperature 1 over all five: .563 .207 .126 .076 .028 (cumulative before
# each: 0 .563 .770 .896 .972); over the top four: .579 .213 .129 .078 (before: 0 .579 .792 .922).
# At temperature 0.5 over all: .829 .112 .041 .015 .002.
LOGITS = [0.0, 2.0, -1.0, 1.0, 0.5]


def kept(temperature: float, top_k: int, top_p: float) -> set[int]:
    out = filter_logits(jnp.asarray([LOGITS], jnp.float32), jnp.asarray([temperature], jnp.float32),
                        i32(top_k), jnp.asarray([top_p], jnp.float32))[0]
    finite = np.isfinite(np.asarray(out))
    np.testing.assert_allclose(np.asarray(out)[finite], np.asarray(LOGITS)[finite] / temperature, rtol=1e-6)
    assert np.all(np.asarray(out)[~finite] == -np.inf)
    return set(np.flatnonzero(finite).tolist())


@pytest.mark.parametrize("temperature, top_k, top_p, expected", [
    (1.0, 0, 1.0, {0, 1, 2, 3, 4}),  # no filter
    (1.0, 2, 1.0, {1, 3}),
    (1.0, 1, 1.0, {1}),
    (1.0, 9, 1.0, {0, 1, 2, 3, 4}),  # k above the vocabulary: all
    (1.0, 0, 0.5, {1}),  # the most likely token alone already reaches it
    (1.0, 0, 0.75, {1, 3}),
    (1.0, 0, 0.8, {1, 3, 4}),
    (1.0, 0, 0.9, {0, 1, 3, 4}),
    (1.0, 4, 0.9, {1, 3, 4}),  # top-p over the top-4 set, renormalised: .792 < .9 but .922 is not
    (0.5, 0, 0.8, {1}),  # a lower temperature sharpens the distribution
    (0.5, 0, 0.9, {1, 3}),
    (1.0, 0, 1e-6, {1}),  # the most likely token is always kept
], ids=str)
def test_filter_logits_keeps_the_hand_computed_top_k_and_top_p_sets(temperature, top_k, top_p, expected) -> None:
    assert kept(temperature, top_k, top_p) == expected


def test_filter_logits_keeps_every_token_tied_at_the_threshold() -> None:
    out = filter_logits(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]), jnp.ones((1,)), i32(1), jnp.ones((1,)))
    np.testing.assert_array_equal(np.isfinite(out[0]), [False, True, True, False])


jitted_sample = jax.jit(sample, static_argnums=6)  # one compile per shape instead of one per operation


def sample_rows(logits: np.ndarray, temperature, top_k, top_p, seeds, index) -> np.ndarray:
    """`sample` (sampling on) of [B, V] logits, each setting one value for every row or [B]."""
    B = logits.shape[0]
    full = lambda v, dtype: jnp.broadcast_to(jnp.asarray(v, dtype), (B,))
    seed = jnp.asarray([split_seed(int(s)) for s in np.broadcast_to(seeds, (B,))], jnp.uint32)
    return np.asarray(jitted_sample(jnp.asarray(logits, jnp.float32), full(temperature, jnp.float32),
                                    full(top_k, jnp.int32), full(top_p, jnp.float32), seed, full(index, jnp.int32),
                                    True))


def test_sample_at_temperature_zero_is_the_argmax_whatever_the_filters_and_seeds() -> None:
    logits = np.random.default_rng(0).normal(0, 1, (8, 50))
    argmax = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(sample_rows(logits, 0.0, 5, 0.3, np.arange(8), 3), argmax)
    np.testing.assert_array_equal(greedy(jnp.asarray(logits)), argmax)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 10.0, 100.0])
def test_sample_with_top_k_one_is_greedy_at_any_temperature(temperature: float) -> None:
    logits = np.random.default_rng(1).normal(0, 1, (64, 50))
    drawn = sample_rows(logits, temperature, 1, 1.0, np.arange(64), np.arange(64))
    np.testing.assert_array_equal(drawn, np.argmax(logits, axis=-1))


def test_a_rows_draw_depends_on_its_seed_and_index_only_not_on_the_other_rows() -> None:
    logits = np.zeros((6, 1000))  # uniform: every draw is the noise's
    alone = sample_rows(logits[:1], 1.0, 0, 1.0, [42], 5)[0]
    mixed = sample_rows(logits, 1.0, 0, 1.0, [1, 2, 42, 3, 4, 5], 5)
    assert mixed[2] == alone
    assert len(set(mixed.tolist())) == 6  # other seeds, other draws
    by_index = sample_rows(logits, 1.0, 0, 1.0, 42, np.arange(6))
    assert by_index[5] == alone and len(set(by_index.tolist())) == 6  # a new key for every token index
    # Seeds that differ only in their high word draw differently: both words make the key.
    high = sample_rows(logits, 1.0, 0, 1.0, 42 + (np.arange(6) << 32), 5)
    assert len(set(high.tolist())) == 6
    assert split_seed(2**63 - 1) == (0xFFFFFFFF, 0x7FFFFFFF) and split_seed(5 + (3 << 32)) == (5, 3)


def chi_square(drawn: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(drawn, minlength=len(probs))
    expected = probs * len(drawn)
    assert np.all(counts[expected == 0] == 0), counts  # nothing outside the kept set
    nonzero = expected > 0
    return float(np.sum((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# Chi-square critical values at p = 0.001: 4 degrees of freedom 18.47, 2 degrees 13.82. The draws are
# seeded, so the outcome is fixed: a wrong distribution fails at every run, a right one never.
def test_temperature_sampling_follows_the_softmax_over_seeds_and_over_token_indices() -> None:
    logits = np.asarray(LOGITS)
    probs = softmax(logits / 0.7)
    rows = np.broadcast_to(logits, (2000, 5))
    by_seed = sample_rows(rows, 0.7, 0, 1.0, np.arange(2000) * 7919 + 1, 0)  # each request's first token
    by_index = sample_rows(rows, 0.7, 0, 1.0, 1234, np.arange(2000))  # one request's tokens
    assert chi_square(by_seed, probs) < 18.47
    assert chi_square(by_index, probs) < 18.47
    # The test has power: the distribution at temperature 1 is rejected.
    assert chi_square(by_seed, softmax(logits)) > 18.47


def test_top_k_and_top_p_sampling_follow_the_softmax_renormalised_over_the_kept_set() -> None:
    logits = np.asarray(LOGITS)
    rows = np.broadcast_to(logits, (2000, 5))
    drawn = sample_rows(rows, 1.0, 4, 0.9, np.arange(2000) + 10**12, 0)  # keeps {1, 3, 4} (see above)
    probs = np.where(np.isin(np.arange(5), [1, 3, 4]), softmax(logits), 0.0)
    assert chi_square(drawn, probs / probs.sum()) < 13.82


# ---------------------------------------------------------------------------------------------------
# The scheduler with a fake model through a real SlotRunner (answers known by hand)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AffineLM:
    """A `Network` for SlotRunner. The next token is (scale * last + offset) % V, scale and offset being its
    head's parameters (so one compiled runner serves several rules). The hidden state carries the token; the
    layer passes it and the cache through untouched (a decode step's first column of the cache stands for
    its new keys and values)."""

    config: OPTConfig
    dtype: Any = jnp.float32

    @property
    def padded_vocab_size(self) -> int:
        return self.config.vocab_size

    def split(self, params: Any) -> tuple[Any, tuple[Any, ...], Any]:
        return {}, ({},) * self.config.num_hidden_layers, params

    def embed(self, params: Any, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        return jnp.broadcast_to(tokens[..., None], (*tokens.shape, self.config.hidden_size)).astype(self.dtype)

    def layer(self, params: Any, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array,
              first_valid: jax.Array, window: int | None):
        if window is not None:  # a decode step returns just its new columns, as the real model does
            return x, cache_k[:, :, : x.shape[1]], cache_v[:, :, : x.shape[1]]
        return x, cache_k, cache_v

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        last = x[:, 0].astype(jnp.int32)
        return jax.nn.one_hot((params["scale"] * last + params["offset"]) % V, V, dtype=jnp.float32)


def affine_params(mesh: jax.sharding.Mesh, scale: int, offset: int) -> dict[str, jax.Array]:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {"scale": jax.device_put(np.int32(scale), sharding), "offset": jax.device_put(np.int32(offset), sharding)}


def rule(runner: SlotRunner, scale: int, offset: int) -> SlotRunner:
    """The runner, emptied, with the fake's next token (scale * last + offset) % V."""
    runner.params = affine_params(runner.mesh, scale, offset)
    runner.reset()
    return runner


@pytest.fixture(scope="module")
def fake_runner() -> SlotRunner:
    """The fake model in 2 slots of 24 positions, chunk 8: prompt buckets 8, 16 and 24, two rows prefilled at
    once in the first (compiling costs about as much per program as random/tiny's: few shapes)."""
    config = OPTConfig(vocab_size=V, hidden_size=4, num_attention_heads=1, num_hidden_layers=1, ffn_dim=4,
                       word_embed_proj_dim=4, max_position_embeddings=24, eos_token_id=EOS)
    mesh = make_mesh(jax.devices()[:1], config)
    shapes = SlotShapes.make(slots=2, max_positions=24, chunk=8, prefill_tokens=16)
    assert shapes.prefill_shapes() == [(1, 8), (2, 8), (1, 16), (1, 24)]
    runner = SlotRunner(model=AffineLM(config), params=affine_params(mesh, 1, 1), mesh=mesh, shapes=shapes)
    runner.warm_up()
    return runner


@pytest.fixture
def counting(fake_runner: SlotRunner) -> SlotRunner:
    """The fake runner, emptied, whose next token is the last one plus one."""
    return rule(fake_runner, 1, 1)


def test_scheduler_with_a_fake_model_stops_each_request_at_eos_or_its_length(counting: SlotRunner) -> None:
    requests = [
        Request(tokens=(5, 7), max_new_tokens=4),  # stops at its length
        Request(tokens=(9, 0), max_new_tokens=3),  # 1 then EOS: EOS is not returned
        Request(tokens=(3,), max_new_tokens=20),  # counts up, wraps past 15, stops at EOS
        Request(tokens=tuple(range(3, 13)), max_new_tokens=1),  # a two-chunk prompt, one token
        Request(tokens=(EOS - 1,), max_new_tokens=5),  # EOS straight from the prefill: nothing
        Request(tokens=(EOS - 1,), max_new_tokens=5, sampling=Sampling(ignore_eos=True)),  # past EOS
        Request(tokens=tuple(range(20)), max_new_tokens=4),  # the 24-column bucket, up to the last position
    ]
    # Seven requests in two slots: the later ones wait for free slots.
    assert Scheduler(counting, eos_id=EOS).generate(requests) == [
        [8, 9, 10, 11], [1], [*range(4, 16), 0, 1], [13], [], [2, 3, 4, 5, 6], [4, 5, 6, 7]]


def test_a_prompt_one_short_of_the_positions_gets_its_one_new_token(counting: SlotRunner) -> None:
    # 23 + 1 = 24 positions, which submit accepts. The slot is read one step late, so the step after its
    # admission still counts it live: 25 columns from its first to t, over the largest window (24).
    assert Scheduler(counting, eos_id=EOS).generate([Request(tuple(range(23)), 1)]) == [[23 % V]]


def test_ignore_eos_generates_exactly_max_new_tokens_from_a_model_that_always_says_eos(fake_runner) -> None:
    always_eos = rule(fake_runner, 0, EOS)
    requests = [Request((5,), 6, Sampling(ignore_eos=True)), Request((5, 6, 7), 1, Sampling(ignore_eos=True)),
                Request((5,), 6), Request((9,), 4, Sampling(temperature=1.0, top_k=1, seed=3, ignore_eos=True))]
    assert Scheduler(always_eos, eos_id=EOS).generate(requests) == [[EOS] * 6, [EOS], [], [EOS] * 4]


def test_each_token_is_passed_on_as_it_comes_and_the_future_gets_them_all(counting: SlotRunner) -> None:
    scheduler = Scheduler(counting, eos_id=EOS)
    heard: list[int] = []
    sequence = scheduler.submit(Request((4,), 6), on_token=heard.append)
    assert sequence.first_token_at is None and not sequence.future.done()
    while scheduler.step():
        pass
    assert sequence.future.result(timeout=0) == heard == sequence.tokens == [5, 6, 7, 8, 9, 10]
    assert sequence.first_token_at is not None and sequence.first_token_at >= sequence.submitted
    assert not scheduler.busy and not scheduler.step()  # nothing left to do


def test_submit_refuses_a_request_beyond_the_models_positions(counting: SlotRunner) -> None:
    scheduler = Scheduler(counting, eos_id=EOS)
    scheduler.submit(Request(tuple(range(20)), 4))  # 24 positions: fits
    with pytest.raises(ValueError, match="exceeds the model's 24 positions"):
        scheduler.submit(Request(tuple(range(20)), 5))


def test_abort_fails_waiting_and_running_requests_and_refuses_new_ones(counting: SlotRunner) -> None:
    scheduler = Scheduler(counting, eos_id=EOS)
    running = [scheduler.submit(Request((4,), 10)) for _ in range(2)]
    waiting = scheduler.submit(Request((4,), 10))  # two slots
    scheduler.step()
    scheduler.step()
    assert all(s.tokens for s in running) and not waiting.tokens
    scheduler.abort(RuntimeError("peer lost"))
    for s in [*running, waiting]:
        with pytest.raises(RuntimeError, match="peer lost"):
            s.future.result(timeout=0)
    with pytest.raises(RuntimeError, match="engine failed: peer lost"):
        scheduler.submit(Request((4,), 1))


def test_run_in_a_thread_serves_requests_submitted_from_others_and_returns_once_stopped(counting) -> None:
    scheduler = Scheduler(counting, eos_id=EOS)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    thread.start()
    try:
        first = scheduler.submit(Request((3, 4), 5))
        assert first.future.result(timeout=30) == [5, 6, 7, 8, 9]
        second = scheduler.submit(Request((10,), 8))  # after the engine went idle
        assert second.future.result(timeout=30) == [11, 12, 13, 14, 15, 0, 1]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
