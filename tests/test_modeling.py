"""Our Flax OPT gives transformers' PyTorch logits on the same weights, however the tokens reach the cache."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from modeling_flax_opt import KVCache, OPTConfig
from opt_reference import VARIANTS, hf_logits, hf_model, load_ours

SEQ = 12  # tokens per test sequence
CACHE = 16  # cache columns: more than SEQ, so some are never written


@dataclasses.dataclass
class Pair:
    """One variant's transformers model and our model loaded from its saved checkpoint."""

    hf: Any
    config: OPTConfig
    params: Any
    run: Callable[..., tuple[jax.Array, KVCache]]  # (params, tokens, cache, column, first_valid) -> (logits, cache)
    replicated: NamedSharding

    def cache(self, batch: int) -> KVCache:
        # Large random values, not zeros: a column that is read before it is written (or a padding column
        # that is read at all) changes the logits far beyond the tolerance.
        rng = np.random.default_rng(7)
        shape = (batch, self.config.num_attention_heads, CACHE, self.config.head_dim)
        layers = range(self.config.num_hidden_layers)
        noise = lambda: tuple(jnp.asarray(rng.normal(0.0, 10.0, shape), jnp.float32) for _ in layers)
        return KVCache(k=noise(), v=noise())

    def logits(self, tokens: np.ndarray, cache: KVCache, column: int, first_valid: Sequence[int]) -> tuple[np.ndarray, KVCache]:
        # Everything placed alike, so that a fresh cache and a returned one hit the same compiled program.
        put = lambda x: jax.device_put(x, self.replicated)
        i32 = lambda x: put(np.asarray(x, np.int32))
        logits, cache = self.run(self.params, i32(tokens), put(cache), i32(column), i32(first_valid))
        return np.asarray(logits), cache


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    model, params = load_ours(folder)
    run = jax.jit(lambda p, tokens, cache, column, first_valid: model.apply({"params": p}, tokens, cache, column, first_valid))
    replicated = NamedSharding(jax.tree_util.tree_leaves(params)[0].sharding.mesh, P())
    return Pair(hf, model.config, params, run, replicated)


def tokens_for(config: OPTConfig, rows: int, length: int, seed: int = 0) -> np.ndarray:
    # Ids from 3 up: none is pad (1) or BOS/EOS (2), so nothing depends on special tokens.
    return np.random.default_rng(seed).integers(3, config.vocab_size, (rows, length), dtype=np.int32)


def left_pad(rows: Sequence[np.ndarray], width: int, fill: np.ndarray | int) -> tuple[np.ndarray, list[int]]:
    """Rows right-aligned in [len(rows), width] over `fill` (a pad id or [B, width] filler tokens); first_valid."""
    batch = np.array(np.broadcast_to(np.asarray(fill, np.int32), (len(rows), width)))
    first_valid = [width - len(r) for r in rows]
    for b, r in enumerate(rows):
        batch[b, first_valid[b] :] = r
    return batch, first_valid


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
        logits, cache = pair.logits(tokens[:, t : t + 1], cache, column=t, first_valid=[0, 0])
        assert_logits_close(logits, reference[:, t])


def test_one_full_forward_pass_over_left_padded_rows_matches_transformers_at_every_prefix_length(pair: Pair) -> None:
    tokens = tokens_for(pair.config, 2, SEQ)
    reference = hf_logits(pair.hf, tokens)
    filler = tokens_for(pair.config, 2, SEQ, seed=2)  # padding columns hold arbitrary tokens: never read
    for t in range(SEQ):  # the compiled pass is reused; row 0 is t + 1 tokens long, row 1 the mirror length
        lengths = [t + 1, SEQ - t]
        batch, first_valid = left_pad([tokens[0, : lengths[0]], tokens[1, : lengths[1]]], SEQ, filler)
        assert first_valid == [SEQ - 1 - t, t]
        logits, _ = pair.logits(batch, pair.cache(2), column=0, first_valid=first_valid)
        assert_logits_close(logits, reference[[0, 1], [t, SEQ - 1 - t]])


def test_two_chunk_prefill_then_decode_matches_transformers(pair: Pair) -> None:
    # Prompts of 9 and 7 tokens in chunks of 5, as the generator runs them: left-padded to 10 columns
    # (1 and 3 pad columns inside the first chunk), chunks written at columns 0 and 5, then decode steps
    # at columns 10, 11, 12 for both rows, each row at its own position (column - first_valid).
    tokens = tokens_for(pair.config, 2, SEQ)
    reference = hf_logits(pair.hf, tokens)
    prompts, chunk = [9, 7], 5
    batch, first_valid = left_pad([tokens[row, :n] for row, n in enumerate(prompts)], 2 * chunk,
                                  pair.config.pad_token_id)
    assert first_valid == [1, 3]
    cache = pair.cache(2)
    logits, cache = pair.logits(batch[:, :chunk], cache, column=0, first_valid=first_valid)
    assert_logits_close(logits, reference[[0, 1], [chunk - 1 - f for f in first_valid]])  # positions 3 and 1
    logits, cache = pair.logits(batch[:, chunk:], cache, column=chunk, first_valid=first_valid)
    assert_logits_close(logits, reference[[0, 1], [n - 1 for n in prompts]])
    for step in range(SEQ - max(prompts)):
        positions = [n + step for n in prompts]
        next_tokens = tokens[[0, 1], positions][:, None]
        logits, cache = pair.logits(next_tokens, cache, column=2 * chunk + step, first_valid=first_valid)
        assert_logits_close(logits, reference[[0, 1], positions])


def test_left_padded_batch_gives_each_row_its_logits_alone_then_decodes_each_at_its_own_position(pair: Pair) -> None:
    lengths = [SEQ, 7]
    full = tokens_for(pair.config, 2, SEQ + 1, seed=1)  # each row's prompt, then the token it decodes next
    batch, first_valid = left_pad([full[row, :n] for row, n in enumerate(lengths)], SEQ, pair.config.pad_token_id)
    assert first_valid == [0, SEQ - 7]
    logits, cache = pair.logits(batch, pair.cache(2), column=0, first_valid=first_valid)
    for row, n in enumerate(lengths):
        alone = hf_logits(pair.hf, full[row : row + 1, :n])[0, n - 1]  # no padding, no other row
        assert_logits_close(logits[row], alone)

    # The short row's pad tokens sit in the cache at columns 0..4: its next token, written at column SEQ
    # like the long row's, must not see them and must get position 7, not SEQ.
    next_tokens = np.array([[full[row, n]] for row, n in enumerate(lengths)], np.int32)
    logits, _ = pair.logits(next_tokens, cache, column=SEQ, first_valid=first_valid)
    for row, n in enumerate(lengths):
        assert_logits_close(logits[row], hf_logits(pair.hf, full[row : row + 1, : n + 1])[0, n])
