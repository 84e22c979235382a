"""Parameters on the mesh: random (for sizing and benchmarks) or read from a checkpoint, shape-checked,
each device reading only its own shard; never first gathered whole on one device."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from modeling_flax_opt import KVCache, OPTConfig, OPTForCausalLM
from opt_utils import WEIGHT_FORMATS, is_random, model_dir
from program_cache import ProgramCache, ProgramSpec
from sharding import MODEL_AXIS, param_shardings, partition_spec, path_name

LOGGER = logging.getLogger("weights")

def build_model(config: OPTConfig, *, dtype: Any, mesh: Mesh) -> OPTForCausalLM:
    """The model for `mesh`: its vocabulary axis padded to a multiple of the devices that split it."""
    return OPTForCausalLM(config, dtype, vocab_multiple=mesh.shape[MODEL_AXIS])



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


def load_weights(model_name: str, model: OPTForCausalLM, mesh: Mesh, *, cache_dir: str | None,
                 programs: ProgramCache | None = None) -> Any:
    """The parameters of `model_name` on `mesh`, ready: random for random/<size>, else its checkpoint
    (a local folder or a hub name, downloaded into `cache_dir`)."""
    begin = time.perf_counter()
    if is_random(model_name):
        params = random_params(model, mesh, programs=programs)
    else:
        params = load_params(model_dir(model_name, cache_dir), model, mesh)
    jax.block_until_ready(params)
    LOGGER.info("weights of %s ready in %.1f s on a mesh of %d devices", model_name, time.perf_counter() - begin,
                mesh.size)
    log_weight_bytes(params, mesh.size)
    return params


def log_weight_bytes(params: Any, mesh_size: int) -> None:
    """Logs the weight bytes each of this rank's devices holds beside the model's split and replicated totals."""
    split, replicated = split_and_replicated_bytes(params)
    LOGGER.info("weight bytes: %s on this rank's devices; the model has %d split over %d devices and %d replicated",
                json.dumps(per_device_bytes(params), sort_keys=True), split, mesh_size, replicated)
