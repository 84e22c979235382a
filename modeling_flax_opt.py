"""Meta's OPT decoder in Flax (linen), stored and computed in one dtype (float16 by default).

The network and nothing else: no requests, no ranks, no Triton. One call runs T new tokens per row
through every layer against a key/value cache and returns the logits of one chosen token per row plus
the cache with the new keys and values written in place:

    logits, cache = model.apply({"params": params}, tokens, cache, start, last)

    tokens: [B, T] int32  the new tokens of each row (right-padded; pad positions are computed and ignored)
    cache:  KVCache       k, v: L arrays of [B, H, C, Dh], valid for positions < start of each row
    start:  [B] int32     the row's number of tokens already in the cache, i.e. the position of tokens[:, 0]
    last:   [B] int32     which of the T tokens gives the row's logits (the row's last real token)

The same program serves prefill (T = chunk) and decode (T = 1). Layers are unrolled, each with its own
parameters and cache arrays: under `nn.scan` XLA:CPU copied every layer's weights out of the stacked
array on every step (6 tokens/s instead of 40 for opt-125m), and per-layer cache arrays are updated in
place where a slice of one stacked array would be copied. The cache is laid out [B, H, C, Dh] so that
attention is a plain batched matmul (10x faster on XLA:CPU than [B, C, H, Dh] at 1024 positions).

The LM head is its own [Dw, V] kernel even when tied to the token embedding (a transposed copy, made
at load time): `x @ kernel` ran 1.7x faster than `x @ embedding.T` on XLA:CPU at batch 8, for one more
V x Dw matrix in memory.

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

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, past_k: jax.Array, past_v: jax.Array, start: jax.Array) -> jax.Array:
    """Softmax attention of T new queries over the row's cached keys and the new keys up to themselves.

    q, k, v: [B, H, T, Dh] (q already scaled); past_k, past_v: [B, H, C, Dh]; start: [B].
    Returns [B, H, T, Dh].
    """
    T, C = q.shape[2], past_k.shape[2]
    neg = jnp.finfo(jnp.float32).min
    past_scores = jnp.einsum("bhtd,bhcd->bhtc", q, past_k, preferred_element_type=jnp.float32)
    past_valid = jnp.arange(C)[None, :] < start[:, None]  # [B, C]
    past_scores = jnp.where(past_valid[:, None, None, :], past_scores, neg)
    new_scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    causal = jnp.tril(jnp.ones((T, T), bool))
    new_scores = jnp.where(causal, new_scores, neg)
    probs = jax.nn.softmax(jnp.concatenate([past_scores, new_scores], axis=-1), axis=-1).astype(q.dtype)
    past_probs, new_probs = probs[..., :C], probs[..., C:]
    out = jnp.einsum("bhtc,bhcd->bhtd", past_probs, past_v) + jnp.einsum("bhts,bhsd->bhtd", new_probs, v)
    return out.astype(q.dtype)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, past_k: jax.Array, past_v: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        # x: [B, T, D] -> out [B, T, D], new keys and values [B, H, T, Dh]
        cfg = self.config
        B, T, D = x.shape
        heads = lambda y: y.reshape(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        bias = cfg.enable_bias
        # OPT scales the projected query (bias included), as fairseq did.
        q = heads(_dense(D, bias, self.dtype, "q_proj")(x) * (cfg.head_dim**-0.5))
        k = heads(_dense(D, bias, self.dtype, "k_proj")(x))
        v = heads(_dense(D, bias, self.dtype, "v_proj")(x))
        out = attend(q, k, v, past_k, past_v, start).transpose(0, 2, 1, 3).reshape(B, T, D)
        return _dense(D, bias, self.dtype, "out_proj")(out), k, v


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, past_k: jax.Array, past_v: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        # x: [B, T, D]; past_k, past_v: [B, H, C, Dh] (this layer's cache)
        cfg = self.config
        pre = cfg.do_layer_norm_before
        attn_norm = _layer_norm(cfg, self.dtype, "self_attn_layer_norm")
        ffn_norm = _layer_norm(cfg, self.dtype, "final_layer_norm")

        h = attn_norm(x) if pre else x
        h, k, v = OPTAttention(cfg, self.dtype, name="self_attn")(h, past_k, past_v, start)
        x = x + h
        x = x if pre else attn_norm(x)

        h = ffn_norm(x) if pre else x
        h = _dense(cfg.ffn_dim, cfg.enable_bias, self.dtype, "fc1")(h)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = _dense(cfg.hidden_size, cfg.enable_bias, self.dtype, "fc2")(h)
        x = x + h
        x = x if pre else ffn_norm(x)
        return x, (k, v)


class OPTForCausalLM(nn.Module):
    """Embeddings, the scanned decoder layers, and the LM head; see the module docstring for the call."""

    config: OPTConfig
    dtype: Any = jnp.float16

    def setup(self) -> None:
        cfg = self.config
        embed = lambda n, d, name: nn.Embed(
            n, d, dtype=self.dtype, param_dtype=self.dtype, embedding_init=nn.initializers.normal(0.02), name=name
        )
        self.embed_tokens = embed(cfg.vocab_size, cfg.word_embed_proj_dim, "embed_tokens")
        self.embed_positions = embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, "embed_positions")
        if cfg.has_projections:
            self.project_in = _dense(cfg.hidden_size, False, self.dtype, "project_in")
            self.project_out = _dense(cfg.word_embed_proj_dim, False, self.dtype, "project_out")
        if cfg.has_final_layer_norm:
            self.final_layer_norm = _layer_norm(cfg, self.dtype, "final_layer_norm")
        self.lm_head = _dense(cfg.vocab_size, False, self.dtype, "lm_head")  # [Dw, V], tied or not
        self.layers = [OPTDecoderLayer(cfg, self.dtype, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]

    def __call__(
        self, tokens: jax.Array, cache: KVCache, start: jax.Array, last: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        # tokens: [B, T]; start, last: [B] -> logits [B, V] (float32), cache with the T new entries written
        cfg = self.config
        T = tokens.shape[1]
        positions = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # [B, T]
        x = self.embed_tokens(tokens)
        if cfg.has_projections:
            x = self.project_in(x)
        # Pad positions past the table (chunk padding) are clamped: garbage but finite, and never read.
        table_positions = jnp.minimum(positions, cfg.max_position_embeddings - 1) + POSITION_OFFSET
        x = x + self.embed_positions(table_positions)
        keys, values = [], []
        for layer, past_k, past_v in zip(self.layers, cache.k, cache.v):
            x, (k, v) = layer(x, past_k, past_v, start)
            keys.append(write_cache(past_k, k, positions))
            values.append(write_cache(past_v, v, positions))
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.logits(x), KVCache(k=tuple(keys), v=tuple(values))

    def logits(self, x: jax.Array) -> jax.Array:
        """[B, D] final hidden states -> [B, V] float32 logits."""
        cfg = self.config
        if cfg.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.has_projections:
            x = self.project_out(x)
        return self.lm_head(x).astype(jnp.float32)


def write_cache(past: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes new [B, H, T, Dh] entries into one layer's [B, H, C, Dh] cache at each row's positions [B, T].

    Positions past the cache are dropped (only chunk padding lands there).
    """
    rows = jnp.arange(positions.shape[0])[:, None]  # [B, 1]
    # Indices on axes 0 and 2 with a slice between them select [B, T, H, Dh].
    return past.at[rows, :, positions].set(new.transpose(0, 2, 1, 3).astype(past.dtype), mode="drop")
