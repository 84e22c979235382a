"""The mesh and the one ordered table of partition rules: weights and the KV cache split the same way
on every rank, Megatron-style column and row parallel over the model axis."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modeling_flax_opt import OPTConfig

MODEL_AXIS = "mp"

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



def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, partition_spec(path_name(path))), abstract_params
    )


def mesh_devices(number_of_gpus: int) -> list[Any]:
    """The first `number_of_gpus` devices of every rank, rank-major: one global mesh over the whole group.

    Each rank then holds only its devices' shards of the weights; neighbouring mesh positions share a node,
    so splitting a head group or a vocabulary range never straddles more nodes than it must.
    """
    per_rank: dict[int, list[Any]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        per_rank.setdefault(device.process_index, []).append(device)
    short = {rank: len(devices) for rank, devices in per_rank.items() if len(devices) < number_of_gpus}
    if short:
        raise SystemExit(f"--number-of-gpus {number_of_gpus} but these ranks see fewer devices: {short}")
    return [device for rank in sorted(per_rank) for device in per_rank[rank][:number_of_gpus]]
