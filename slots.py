"""The pure, jittable slot functions: sampling, prefill placement, admission, a decode step, the
column shift. No state, no compilation: `runner.py` compiles them.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from modeling_flax_opt import KVCache
from plan import SEED_WORDS

# The cache holds S slots x C columns per layer, allocated once, heads split like the weights. Every
# decode step writes every slot's new key and value at one common column t (a dynamic_update_slice,
# in place: per-row columns needed a scatter that XLA:CPU ran at half the speed of a whole step) and t
# advances by one. A slot's sequence is therefore laid out so that its newest token lands at t: a new
# request is prefilled on its own (left-padded to its prompt bucket P, in a small cache of P columns)
# and its P columns are copied into its slot at t-P..t-1, its first real column being t - prompt
# length. A row's position is its column minus that first column, so rows that started at different
# times decode side by side. Attention reads only the W columns ending at t (W a power of two covering
# the oldest live row), so a step costs what the live sequences need, not C.
# Columns move with a roll of the whole cache (`shift_columns`): to the left when t reaches C, by the
# columns no live row reads any more (C - M columns of slack make that rare), and to the right when a
# prompt bucket longer than t arrives (the columns it wraps round are past t, unused).


@flax.struct.dataclass
class SlotState:
    """What a decode step carries for every slot ([S] each), and the common write column."""

    tokens: jax.Array  # int32: each slot's newest token, not yet in the cache
    first_valid: jax.Array  # int32: the slot's first real column (its position 0)
    generated: jax.Array  # int32: tokens generated so far (the index that picks the sampling key)
    remaining: jax.Array  # int32: tokens the slot may still generate
    done: jax.Array  # bool: finished (EOS or its output length) or empty; frozen from then on
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    seed: jax.Array  # [S, 2] uint32
    ignore_eos: jax.Array  # bool
    column: jax.Array  # [] int32: the cache column every slot's next token is written to

    @classmethod
    def empty(cls, slots: int, column: int) -> "SlotState":
        zeros = lambda dtype: jnp.zeros((slots,), dtype)
        return cls(tokens=zeros(jnp.int32), first_valid=zeros(jnp.int32), generated=zeros(jnp.int32),
                   remaining=zeros(jnp.int32), done=jnp.ones((slots,), bool), temperature=zeros(jnp.float32),
                   top_k=zeros(jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
                   seed=jnp.zeros((slots, SEED_WORDS), jnp.uint32), ignore_eos=zeros(bool), column=jnp.int32(column))


@flax.struct.dataclass
class Admissions:
    """The rows of one prefill call and where they go: [b] each (rows past the real ones have valid False)."""

    slot: jax.Array  # int32
    length: jax.Array  # int32: true prompt length
    budget: jax.Array  # int32: max_new_tokens
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    seed: jax.Array  # [b, 2] uint32
    ignore_eos: jax.Array  # bool
    valid: jax.Array  # bool


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32, the most likely token."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sampling_keys(seed: jax.Array, index: jax.Array) -> jax.Array:
    """[B, 2] uint32 seeds, [B] token indices -> [B] keys: a row's n-th token has its own key whatever the batch."""
    key = lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s[0]), s[1]), i)
    return jax.vmap(key)(seed, index)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] logits / temperature with every token outside the row's top-k and top-p set at -inf.

    top_k: [B] (0 = all); top_p: [B] (1 = all). top-p is taken over the top-k set, most likely first,
    and always keeps the most likely token. Ties at the threshold are all kept.
    """
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)  # [B]
    in_top_k = jnp.arange(V)[None, :] < k[:, None]  # [B, V] over ranks
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
    kept = in_top_k & (before < top_p[:, None])  # the first rank is always kept
    threshold = jnp.take_along_axis(ranked, (jnp.sum(kept, axis=-1) - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seed: jax.Array,
           index: jax.Array, sampling: bool) -> jax.Array:
    """[B, V] float32 logits -> [B] int32: argmax where temperature is 0, else a draw from the filtered softmax.

    The draw is argmax(filtered logits + Gumbel noise), the noise from the row's seed and token index.
    `sampling` is static: the host knows whether any row samples and runs the program compiled without
    the sort and the noise when none does (a device-side cond costs a device-to-host sync on GPUs).
    """
    if not sampling:
        return greedy(logits)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(sampling_keys(seed, index))
    drawn = greedy(filter_logits(logits, temperature, top_k, top_p) + noise)
    return jnp.where(temperature > 0, drawn, greedy(logits))


# (params, tokens [B, T], cache, column [], first_valid [B], window) -> (logits [B, V] of tokens[:, -1], cache)
ModelFn = Callable[..., tuple[jax.Array, KVCache]]


def prefill_chunk(model: ModelFn, params: Any, cache: KVCache, tokens: jax.Array, column: jax.Array,
                  first_valid: jax.Array) -> tuple[KVCache, jax.Array]:
    """Runs one chunk of left-padded prompts into cache columns column..column+T-1.

    tokens: [b, T]; column: []; first_valid: [b]. Returns the cache and the [b, V] logits after the
    chunk: each row's first-token logits when the chunk is the prompts' last.
    """
    logits, cache = model(params, tokens, cache, column, first_valid, None)
    return cache, logits


def place_prompt(layer: jax.Array, prompts: jax.Array, slot: jax.Array, valid: jax.Array, t: jax.Array) -> jax.Array:
    """Copies one layer's prefilled rows into their slots so that their last prompt column sits at t-1.

    layer: [S, H, C, Dh]; prompts: [b, H, P, Dh], left-padded; slot, valid: [b]. Rows with valid False
    change nothing. Each copy is in place; a loop rather than b unrolled copies compiles in constant time.
    """
    P = prompts.shape[2]

    def copy(i: jax.Array, layer: jax.Array) -> jax.Array:
        at = (slot[i], 0, t - P, 0)
        new = jax.lax.dynamic_slice_in_dim(prompts, i, 1, axis=0)  # [1, H, P, Dh]
        old = jax.lax.dynamic_slice(layer, at, new.shape)
        return jax.lax.dynamic_update_slice(layer, jnp.where(valid[i], new, old), at)

    return jax.lax.fori_loop(0, prompts.shape[0], copy, layer)


def admit_state(state: SlotState, logits: jax.Array, rows: Admissions, eos_id: int,
                sampling: bool) -> tuple[SlotState, jax.Array]:
    """The state with each prefilled row in its slot: its first token (picked from logits [b, V]) and settings.

    Returns the state and the first tokens [b]. Rows with valid False change nothing.
    """
    b, t = logits.shape[0], state.column
    first = sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, jnp.zeros((b,), jnp.int32), sampling)
    target = jnp.where(rows.valid, rows.slot, state.tokens.shape[0])  # out of range: dropped
    put = lambda array, values: array.at[target].set(values, mode="drop")
    ended = ((first == eos_id) & ~rows.ignore_eos) | (rows.budget <= 1)
    state = state.replace(
        tokens=put(state.tokens, first), first_valid=put(state.first_valid, t - rows.length),
        generated=put(state.generated, jnp.ones_like(first)), remaining=put(state.remaining, rows.budget - 1),
        done=put(state.done, ended), temperature=put(state.temperature, rows.temperature),
        top_k=put(state.top_k, rows.top_k), top_p=put(state.top_p, rows.top_p), seed=put(state.seed, rows.seed),
        ignore_eos=put(state.ignore_eos, rows.ignore_eos),
    )
    return state, first


def admit(cache: KVCache, state: SlotState, prompts: KVCache, logits: jax.Array, rows: Admissions,
          eos_id: int, sampling: bool) -> tuple[KVCache, SlotState, jax.Array]:
    """Copies prefilled rows into their slots (`place_prompt` per layer) and starts them (`admit_state`).

    prompts: [b, H, P, Dh] per layer, left-padded; logits: [b, V]. Returns the cache, the state with
    each row's first token, and those first tokens [b].
    """
    place = lambda layer, new: place_prompt(layer, new, rows.slot, rows.valid, state.column)
    cache = KVCache(k=tuple(map(place, cache.k, prompts.k)), v=tuple(map(place, cache.v, prompts.v)))
    state, first = admit_state(state, logits, rows, eos_id, sampling)
    return cache, state, first


def advance(state: SlotState, logits: jax.Array, eos_id: int, sampling: bool) -> SlotState:
    """The state after one decode step whose logits [B, V] are given: a new token for every unfinished slot.

    Finished slots repeat their last token, which nobody reads.
    """
    picked = sample(logits, state.temperature, state.top_k, state.top_p, state.seed, state.generated, sampling)
    tokens = jnp.where(state.done, state.tokens, picked)
    live = (~state.done).astype(jnp.int32)
    remaining = state.remaining - live
    done = state.done | ((tokens == eos_id) & ~state.ignore_eos) | (remaining <= 0)
    return state.replace(tokens=tokens, generated=state.generated + live, remaining=remaining, done=done,
                         column=state.column + 1)


def advance_first_rows(state: SlotState, logits: jax.Array, eos_id: int, sampling: bool) -> SlotState:
    """`advance` for slots 0..rows-1 (rows: logits' first axis); the other slots keep their state."""
    rows = logits.shape[0]
    head = lambda x: x[:rows] if x.ndim else x  # the state's column is a scalar, shared
    stepped = advance(jax.tree_util.tree_map(head, state), logits, eos_id, sampling)
    merge = lambda whole, part: whole.at[:rows].set(part) if whole.ndim else part
    return jax.tree_util.tree_map(merge, state, stepped)


def decode_step(model: ModelFn, params: Any, cache: KVCache, state: SlotState, eos_id: int,
                window: int, sampling: bool) -> tuple[KVCache, SlotState]:
    """One new token for every unfinished slot, through the whole model in one call.

    The cache is only read: the result's first part is the step's new keys and values ([S, H, 1, Dh] per
    layer), which `write_step` puts at the step's column in a program of its own.
    """
    logits, new = model(params, state.tokens[:, None], cache, state.column, state.first_valid, window)
    return new, advance(state, logits, eos_id, sampling)


def decode_first_rows(model: ModelFn, params: Any, cache: KVCache, state: SlotState, eos_id: int,
                      window: int, rows: int, sampling: bool) -> tuple[KVCache, SlotState]:
    """`decode_step` over slots 0..rows-1 only, so that a step costs what its live rows need, not S.

    The scheduler puts new requests in the lowest free slots and asks for the smallest compiled `rows`
    that covers every live one; the other slots keep their state and their cache columns. Returns the
    new keys and values ([rows, H, 1, Dh] per layer) and the whole state. The runner runs the same
    computation in stages (`SlotRunner`): embed, each layer, then `advance_first_rows`.
    """
    part = KVCache(k=tuple(x[:rows] for x in cache.k), v=tuple(x[:rows] for x in cache.v))
    logits, new = model(params, state.tokens[:rows, None], part, state.column, state.first_valid[:rows], window)
    return new, advance_first_rows(state, logits, eos_id, sampling)


def write_step(cache: KVCache, new: KVCache, after: jax.Array) -> KVCache:
    """Writes a decode step's new keys and values (in place: the cache is donated).

    `after` is the state's column after the step, already on the devices: the step wrote for column
    after - 1, and no host value has to be sent each step.
    """
    column = after - 1
    put = lambda layer, entries: jax.lax.dynamic_update_slice(layer, entries, (0, 0, column, 0))
    return KVCache(k=tuple(map(put, cache.k, new.k)), v=tuple(map(put, cache.v, new.v)))


def retarget(state: SlotState, by: jax.Array) -> SlotState:
    """`shift_columns` when no column of the cache is read again (no live slot): t and first columns only.

    Rolling a whole cache that nobody reads copied it (random/125M, 16 slots: 3.6 GB, 6.6 s at the first
    request after a start, whose first pages the copy also faulted in).
    """
    return state.replace(column=state.column - by, first_valid=state.first_valid - by)


def shift_columns(cache: KVCache, state: SlotState, by: jax.Array) -> tuple[KVCache, SlotState]:
    """Rolls every slot's columns `by` to the left (negative: to the right), t and first columns with them.

    The columns that wrap round must be unread: left, those before every live row; right, those past t.
    """
    roll = lambda layer: jnp.roll(layer, -by, axis=2)
    cache = KVCache(k=tuple(map(roll, cache.k)), v=tuple(map(roll, cache.v)))
    return cache, state.replace(column=state.column - by, first_valid=state.first_valid - by)
