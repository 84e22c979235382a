"""Meta's OPT decoder in Flax (linen), stored and computed in one dtype (float16 by default).

The network and nothing else: no requests, no ranks, no Triton. One call runs T new tokens per row
through every layer against a key/value cache, writes their keys and values into cache columns
`column .. column+T-1` (the same columns for every row) and returns the logits of the last token:

    logits, cache = model.apply({"params": params}, tokens, cache, column, first_valid, window=None)

    tokens:      [B, T] int32  the new tokens; rows are left-padded, so every row's newest token is last
    cache:       KVCache       k, v: L arrays of [B, H, C, Dh]
    column:      [] int32      the cache column of tokens[:, 0]
    first_valid: [B] int32     each row's first real column: columns before it hold padding, never read
    window:      static int or None. With a window, only the `window` cache columns ending at the last new
                 token's are read, the cache is not written, and the returned "cache" holds just the T new
                 columns ([B, H, T, Dh] per layer) for the caller to write with `write_cache`: XLA:CPU copied
                 the whole cache every step when one program both sliced and updated it (22 ms instead of
                 3 for random/tiny with 16 slots of 3072 columns)
    logits:      [B, V_padded] float32

A row's position (for OPT's learned position embeddings) is its column minus `first_valid`. Writing
every row at one common column is a `dynamic_update_slice`, done in place; per-row positions needed a
scatter, which XLA:CPU ran at half the speed of the whole rest of a decode step.

The same call serves prefill (T = chunk) and decode (T = 1). Its pieces, `embed`, one `OPTDecoderLayer`
and `logits`, are also applied on their own: the server compiles each as a program and calls the layer
program once per layer (runner.SlotRunner). Layers are unrolled, each with its own
parameters and cache arrays: under `nn.scan` XLA:CPU copied every layer's weights out of the stacked
array on every step (6 tokens/s instead of 40 for opt-125m), and per-layer cache arrays are updated in
place where a slice of one stacked array would be copied. The cache is laid out [B, H, C, Dh] so that
attention is a plain batched matmul (10x faster on XLA:CPU than [B, C, H, Dh] at 1024 positions).

The LM head is its own [Dw, V] kernel even when tied to the token embedding (a transposed copy, made
at load time): `x @ kernel` ran 1.7x faster than `x @ embedding.T` on XLA:CPU at batch 8, for one more
V x Dw matrix in memory.

The vocabulary axis (embedding rows, LM head columns) is padded up to a multiple of `vocab_multiple`:
both are split over the devices, JAX shards only evenly, and OPT's 50272 = 2^5 x 1571 splits over
1, 2, 4, 8, 16 or 32 devices only (not 3 or 6). The logits keep the padded width, since slicing an
unevenly split array would gather it, and the padded ids get float32's minimum so that no sampler
ever picks them.

Every variant the facebook/opt-* checkpoints use is covered: pre- and post-LayerNorm
(`do_layer_norm_before`), `word_embed_proj_dim` != `hidden_size` (`project_in` / `project_out`),
learned positions offset by 2, `_remove_final_layer_norm`, `enable_bias`,
`layer_norm_elementwise_affine`, the activation, and a tied or separate LM head.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# OPT's learned positions reserve the first two rows (a fairseq padding convention).
POSITION_OFFSET = 2

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
}


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """The fields of transformers' `OPTConfig` that change the computation."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation_function!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "OPTConfig":
        """Builds the config from a transformers `config.json` dict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in names and v is not None}
        if "_remove_final_layer_norm" in hf:
            values["remove_final_layer_norm"] = bool(hf["_remove_final_layer_norm"])
        values.setdefault("word_embed_proj_dim", values.get("hidden_size", cls.hidden_size))
        eos = values.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            values["eos_token_id"] = int(eos[0])
        return cls(**values)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer; heads are the axis that model parallelism splits."""

    k: tuple[jax.Array, ...]  # L x [B, H, C, Dh]
    v: tuple[jax.Array, ...]  # L x [B, H, C, Dh]

    @classmethod
    def zeros(cls, config: OPTConfig, batch: int, length: int, dtype: Any) -> "KVCache":
        shape = (batch, config.num_attention_heads, length, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers), v=tuple(jnp.zeros(shape, dtype) for _ in layers))


def _dense(features: int, use_bias: bool, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _layer_norm(config: OPTConfig, dtype: Any, name: str) -> nn.LayerNorm:
    # Statistics are taken in float32 by flax whatever the dtype, which keeps FP16 stable.
    affine = config.layer_norm_elementwise_affine
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=dtype, use_bias=affine, use_scale=affine, name=name)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
    """Softmax attention of T new queries over the row's cache columns, the new ones up to themselves.

    q: [B, H, T, Dh] (already scaled), for columns column..column+T-1; keys, values: [B, H, C, Dh], the
    whole cache with the new keys and values in place; first_valid: [B]. Returns [B, H, T, Dh].
    Padding queries get finite garbage (they attend to at least their own column).
    """
    T, C = q.shape[2], keys.shape[2]
    scores = jnp.einsum("bhtd,bhcd->bhtc", q, keys, preferred_element_type=jnp.float32)
    cols = jnp.arange(C)[None, None, :]  # [1, 1, C]
    query_cols = (column + jnp.arange(T))[None, :, None]  # [1, T, 1]
    valid = (cols >= first_valid[:, None, None]) & (cols <= query_cols)  # [B, T, C]
    scores = jnp.where(valid[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhtc,bhcd->bhtd", probs, values).astype(q.dtype)


def attend_window(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                  column: jax.Array, first_valid: jax.Array, window: int) -> jax.Array:
    """One new query per row over the `window` cache columns before it and its own new key and value.

    q, k, v: [B, H, 1, Dh] (q already scaled), for column `column`; cache_k, cache_v: [B, H, C, Dh], only
    read (column `column` itself is not written yet: its new entry is `k`, `v`); first_valid: [B].
    Returns [B, H, 1, Dh].

    Written as products and sums in float32, not as einsums: with one query a batched matmul is B x H
    tiny matrix-vector products, which XLA:CPU ran at a few MFLOP/s, and an einsum over the window needs
    the window copied out of the cache with the new column put in. Here the window's dynamic slice is
    fused into the loops that read it, and the new column joins the softmax on its own.
    """
    C = cache_k.shape[2]
    start = jnp.clip(column + 1 - window, 0, C - window).astype(jnp.int32)
    keys = jax.lax.dynamic_slice_in_dim(cache_k, start, window, axis=2)  # [B, H, W, Dh]
    values = jax.lax.dynamic_slice_in_dim(cache_v, start, window, axis=2)  # [B, H, W, Dh]
    f32 = lambda x: x.astype(jnp.float32)
    old = jnp.sum(f32(q) * f32(keys), axis=-1)  # [B, H, W]
    cols = start + jnp.arange(window)  # [W]
    valid = (cols[None, :] >= first_valid[:, None]) & (cols[None, :] < column)  # [B, W]
    old = jnp.where(valid[:, None, :], old, -jnp.inf)
    new = jnp.sum(f32(q) * f32(k), axis=-1)  # [B, H, 1]
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), new)  # [B, H, 1]: finite, `new` is
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)  # [B, H, W], [B, H, 1]
    total = jnp.sum(p_old, axis=-1, keepdims=True) + p_new  # [B, H, 1]
    mixed = jnp.sum(p_old[..., None] * f32(values), axis=2, keepdims=True) + p_new[..., None] * f32(v)  # [B, H, 1, Dh]
    return (mixed / total[..., None]).astype(q.dtype)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array, first_valid: jax.Array,
        window: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        # x: [B, T, D]; cache_k, cache_v: [B, H, C, Dh] -> out [B, T, D] and the cache with the T new columns.
        # Writing before attending leaves no reader of the old cache, so XLA updates it in place.
        cfg = self.config
        B, T, D = x.shape
        heads = lambda y: y.reshape(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        bias = cfg.enable_bias
        # OPT scales the projected query (bias included), as fairseq did.
        q = heads(_dense(D, bias, self.dtype, "q_proj")(x) * (cfg.head_dim**-0.5))
        k = heads(_dense(D, bias, self.dtype, "k_proj")(x))
        v = heads(_dense(D, bias, self.dtype, "v_proj")(x))
        if window is not None:  # read W columns, not C; the caller writes the new ones (see the module doc)
            if T != 1:
                raise ValueError(f"a windowed call decodes one token per row, got {T}")
            out = attend_window(q, k, v, cache_k, cache_v, column, first_valid, window)
            cache_k, cache_v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
        else:
            cache_k, cache_v = write_cache(cache_k, k, column), write_cache(cache_v, v, column)
            out = attend(q, cache_k, cache_v, column, first_valid)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, D)
        return _dense(D, bias, self.dtype, "out_proj")(out), cache_k, cache_v


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array, first_valid: jax.Array,
        window: int | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        # x: [B, T, D]; cache_k, cache_v: [B, H, C, Dh] (this layer's) -> x, the cache with T new columns
        cfg = self.config
        pre = cfg.do_layer_norm_before
        attn_norm = _layer_norm(cfg, self.dtype, "self_attn_layer_norm")
        ffn_norm = _layer_norm(cfg, self.dtype, "final_layer_norm")

        h = attn_norm(x) if pre else x
        h, cache_k, cache_v = OPTAttention(cfg, self.dtype, name="self_attn")(
            h, cache_k, cache_v, column, first_valid, window)
        x = x + h
        x = x if pre else attn_norm(x)

        h = ffn_norm(x) if pre else x
        h = _dense(cfg.ffn_dim, cfg.enable_bias, self.dtype, "fc1")(h)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = _dense(cfg.hidden_size, cfg.enable_bias, self.dtype, "fc2")(h)
        x = x + h
        x = x if pre else ffn_norm(x)
        return x, (cache_k, cache_v)


class OPTForCausalLM(nn.Module):
    """Embeddings, the scanned decoder layers, and the LM head; see the module docstring for the call."""

    config: OPTConfig
    dtype: Any = jnp.float16
    vocab_multiple: int = 1  # the vocabulary axis is padded to a multiple of this (the devices splitting it)

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of `vocab_multiple`: the rows and columns the weights have."""
        return -(-self.config.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def setup(self) -> None:
        cfg = self.config
        embed = lambda n, d, name: nn.Embed(
            n, d, dtype=self.dtype, param_dtype=self.dtype, embedding_init=nn.initializers.normal(0.02), name=name
        )
        self.embed_tokens = embed(self.padded_vocab_size, cfg.word_embed_proj_dim, "embed_tokens")
        self.embed_positions = embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, "embed_positions")
        if cfg.has_projections:
            self.project_in = _dense(cfg.hidden_size, False, self.dtype, "project_in")
            self.project_out = _dense(cfg.word_embed_proj_dim, False, self.dtype, "project_out")
        if cfg.has_final_layer_norm:
            self.final_layer_norm = _layer_norm(cfg, self.dtype, "final_layer_norm")
        self.lm_head = _dense(self.padded_vocab_size, False, self.dtype, "lm_head")  # [Dw, V_padded], tied or not
        self.layers = [OPTDecoderLayer(cfg, self.dtype, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]

    def __call__(
        self, tokens: jax.Array, cache: KVCache, column: jax.Array, first_valid: jax.Array, window: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        # tokens: [B, T]; column: []; first_valid: [B]; window: static, see `attend` -> logits [B, V_padded] (float32) of tokens[:, -1], new cache
        x = self.embed(tokens, column, first_valid)
        keys, values = [], []
        for layer, cache_k, cache_v in zip(self.layers, cache.k, cache.v):
            x, (cache_k, cache_v) = layer(x, cache_k, cache_v, column, first_valid, window)
            keys.append(cache_k)
            values.append(cache_v)
        return self.logits(x[:, -1]), KVCache(k=tuple(keys), v=tuple(values))

    def embed(self, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        """[B, T] tokens at cache columns column..column+T-1 -> [B, T, D] inputs of the first layer."""
        cfg = self.config
        columns = column + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [T]
        # Padding columns (before first_valid) get position 0: garbage but finite, and never attended to.
        positions = jnp.clip(columns[None, :] - first_valid[:, None], 0, cfg.max_position_embeddings - 1)
        x = self.embed_tokens(tokens)
        if cfg.has_projections:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def logits(self, x: jax.Array) -> jax.Array:
        """[B, D] final hidden states -> [B, V_padded] float32 logits, float32's minimum at the padded ids."""
        cfg = self.config
        if cfg.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.has_projections:
            x = self.project_out(x)
        logits = self.lm_head(x).astype(jnp.float32)
        if self.padded_vocab_size == cfg.vocab_size:
            return logits
        # A comparison with an iota, elementwise: each device masks its own columns, nothing is gathered.
        real = jnp.arange(self.padded_vocab_size) < cfg.vocab_size  # [V_padded]
        return jnp.where(real[None, :], logits, jnp.finfo(jnp.float32).min)


def write_cache(past: jax.Array, new: jax.Array, column: jax.Array) -> jax.Array:
    """Writes new [B, H, T, Dh] entries into one layer's [B, H, C, Dh] cache at columns column..column+T-1.

    The caller keeps column + T <= C (dynamic_update_slice would move a write that runs past the end).
    """
    return jax.lax.dynamic_update_slice(past, new.astype(past.dtype), (0, 0, column, 0))
