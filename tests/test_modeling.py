"""Our Flax OPT gives transformers' PyTorch logits on the same weights, however the tokens reach the cache."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from modeling_flax_opt import KVCache, OPTConfig
from opt_reference import VARIANTS, hf_logits, hf_model, load_ours

SEQ = 12  # tokens per test sequence
CACHE = 16  # cache positions: more than SEQ, so some are never written


@dataclasses.dataclass
class Pair:
    """One variant's transformers model and our model loaded from its saved checkpoint."""

    hf: Any
    config: OPTConfig
    params: Any
    run: Callable[..., tuple[jax.Array, KVCache]]  # (params, tokens, cache, start, last) -> (logits, cache)
    replicated: NamedSharding

    def cache(self, batch: int) -> KVCache:
        return KVCache.zeros(self.config, batch, CACHE, jnp.float32)

    def logits(self, tokens: np.ndarray, cache: KVCache, start: list[int], last: list[int]) -> tuple[np.ndarray, KVCache]:
        # Everything placed alike, so that a fresh cache and a returned one hit the same compiled program.
        put = lambda x: jax.device_put(x, self.replicated)
        i32 = lambda x: put(np.asarray(x, np.int32))
        logits, cache = self.run(self.params, i32(tokens), put(cache), i32(start), i32(last))
        return np.asarray(logits), cache


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    model, params = load_ours(folder)
    run = jax.jit(lambda p, tokens, cache, start, last: model.apply({"params": p}, tokens, cache, start, last))
    replicated = NamedSharding(jax.tree_util.tree_leaves(params)[0].sharding.mesh, P())
    return Pair(hf, model.config, params, run, replicated)


def tokens_for(config: OPTConfig, rows: int, length: int, seed: int = 0) -> np.ndarray:
    # Ids from 3 up: none is pad (1) or BOS/EOS (2), so nothing depends on special tokens.
    return np.random.default_rng(seed).integers(3, config.vocab_size, (rows, length), dtype=np.int32)


def assert_logits_close(ours: np.ndarray, reference: np.ndarray) -> None:
    # float32 through two tiny layers agrees to ~1e-7 relative; 1e-5 of the logit scale leaves room
    # for summation order and still catches any real difference (see the test below).
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * max(1.0, float(np.abs(reference).max())))


# Every test runs batches of two rows, so each variant compiles three shapes: [2, 1], [2, 5] and [2, SEQ].


def test_reference_logits_differ_between_positions_far_beyond_the_tolerance(pair: Pair) -> None:
    """Guards the tolerance: matching logits only means something if logits of other positions do not match."""
    reference = hf_logits(pair.hf, tokens_for(pair.config, 1, SEQ))[0]
    assert np.abs(reference[1:] - reference[:-1]).max(axis=-1).min() > 0.5


def test_cached_decoding_one_token_at_a_time_matches_transformers_at_every_position(pair: Pair) -> None:
    tokens = tokens_for(pair.config, 2, SEQ)
    reference = hf_logits(pair.hf, tokens)  # [2, T, V]
    cache = pair.cache(2)
    for t in range(SEQ):
        logits, cache = pair.logits(tokens[:, t : t + 1], cache, start=[t, t], last=[0, 0])
        assert_logits_close(logits, reference[:, t])


def test_one_full_forward_pass_matches_transformers_at_the_last_position_it_is_asked_for(pair: Pair) -> None:
    tokens = tokens_for(pair.config, 2, SEQ)
    reference = hf_logits(pair.hf, tokens)
    for t in range(SEQ):  # the compiled pass is reused; row 1 asks for the mirror position
        logits, _ = pair.logits(tokens, pair.cache(2), start=[0, 0], last=[t, SEQ - 1 - t])
        assert_logits_close(logits, reference[[0, 1], [t, SEQ - 1 - t]])


def test_two_chunk_prefill_then_decode_matches_transformers(pair: Pair) -> None:
    # A 9-token prompt in chunks of 5: the second chunk ends in a pad token, written to the cache at
    # position 9 and overwritten by the first decode step, as the generator does.
    tokens = tokens_for(pair.config, 2, SEQ)
    reference = hf_logits(pair.hf, tokens)
    prompt, chunk = 9, 5
    second = np.full((2, chunk), pair.config.pad_token_id, np.int32)
    second[:, : prompt - chunk] = tokens[:, chunk:prompt]
    cache = pair.cache(2)
    logits, cache = pair.logits(tokens[:, :chunk], cache, start=[0, 0], last=[chunk - 1] * 2)
    assert_logits_close(logits, reference[:, chunk - 1])
    logits, cache = pair.logits(second, cache, start=[chunk] * 2, last=[prompt - chunk - 1] * 2)
    assert_logits_close(logits, reference[:, prompt - 1])
    for t in range(prompt, SEQ):
        logits, cache = pair.logits(tokens[:, t : t + 1], cache, start=[t, t], last=[0, 0])
        assert_logits_close(logits, reference[:, t])


def test_right_padded_batch_gives_each_row_its_logits_alone_then_decodes_each_at_its_own_position(pair: Pair) -> None:
    lengths = [SEQ, 7]
    full = tokens_for(pair.config, 2, SEQ + 1, seed=1)  # each row's prompt, then the token it decodes next
    batch = np.full((2, SEQ), pair.config.pad_token_id, np.int32)
    for row, n in enumerate(lengths):
        batch[row, :n] = full[row, :n]
    logits, cache = pair.logits(batch, pair.cache(2), start=[0, 0], last=[n - 1 for n in lengths])
    for row, n in enumerate(lengths):
        alone = hf_logits(pair.hf, full[row : row + 1, :n])[0, n - 1]  # no padding, no other row
        assert_logits_close(logits[row], alone)

    # The short row's pad tokens sit in the cache at positions 7..11: its next token must not see them.
    next_tokens = np.array([[full[row, n]] for row, n in enumerate(lengths)], np.int32)
    logits, _ = pair.logits(next_tokens, cache, start=lengths, last=[0, 0])
    for row, n in enumerate(lengths):
        assert_logits_close(logits[row], hf_logits(pair.hf, full[row : row + 1, : n + 1])[0, n])
