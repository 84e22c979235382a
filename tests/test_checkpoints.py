"""Every checkpoint format loads into the same params; bad checkpoints and unknown parameters fail by name."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax.serialization import msgpack_serialize
from flax.traverse_util import unflatten_dict
from jax.sharding import PartitionSpec as P

import opt_utils
from sharding import make_mesh, partition_spec, path_name
from weights import VOCAB_AXES, abstract_params, load_params, tensor_plan
from modeling_flax_opt import OPTConfig, OPTForCausalLM
from opt_reference import VARIANTS, hf_model, load_ours, state_dict

# ---------------------------------------------------------------------------------------------------
# Writers: one checkpoint folder per format, all from the same transformers model
# ---------------------------------------------------------------------------------------------------


def write_safetensors(hf: Any, folder: Path) -> None:
    hf.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()


def write_sharded_safetensors(hf: Any, folder: Path) -> None:
    hf.save_pretrained(folder, max_shard_size="20KB")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1, shards


def write_pytorch_bin(hf: Any, folder: Path) -> None:
    # transformers 5 always writes safetensors, so the .bin of older checkpoints is made by hand.
    hf.config.save_pretrained(folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")


def write_sharded_pytorch_bin_with_opt_model_names(hf: Any, folder: Path) -> None:
    # Two shards with OPTModel's names ("decoder.*", no "model." prefix), as some older checkpoints have.
    hf.config.save_pretrained(folder)
    tensors = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_flax_msgpack(hf: Any, folder: Path) -> None:
    """transformers' Flax layout: a nested tree, Dense `kernel` = [in, out], `embedding`, LayerNorm `scale`."""
    hf.config.save_pretrained(folder)
    flat = {}
    for name, value in state_dict(hf).items():
        *modules, leaf = name.split(".")
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue  # Flax OPT computes the tied head from the embedding and stores no kernel
        if leaf == "weight" and modules[-1].startswith("embed_"):
            leaf = "embedding"
        elif leaf == "weight" and modules[-1].endswith("layer_norm"):
            leaf = "scale"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        flat[(*modules, leaf)] = value
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(flat)))


WRITERS: dict[str, Callable[[Any, Path], None]] = {
    f.__name__.removeprefix("write_"): f
    for f in (write_safetensors, write_sharded_safetensors, write_pytorch_bin,
              write_sharded_pytorch_bin_with_opt_model_names, write_flax_msgpack)
}
# A tied head (nothing stored for it) and an untied one with project_in/out: every kind of tensor.
FORMAT_VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": dict(variant="pre_ln"),
    "post_ln_projections_untied": dict(variant="post_ln_projections", tie_word_embeddings=False),
}


def hf_for(name: str) -> Any:
    spec = dict(FORMAT_VARIANTS[name])
    return hf_model(spec.pop("variant"), **spec)


def flat_params(params: Any) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module", params=sorted(FORMAT_VARIANTS))
def safetensors_params(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(variant name, params loaded from model.safetensors): the baseline every other format must equal."""
    folder = tmp_path_factory.mktemp("baseline")
    write_safetensors(hf_for(request.param), folder)
    return request.param, flat_params(load_ours(folder)[1])


def test_safetensors_load_puts_each_transformers_tensor_where_our_model_uses_it(safetensors_params) -> None:
    variant, params = safetensors_params
    hf = hf_for(variant)
    sd = state_dict(hf)
    np.testing.assert_array_equal(params["embed_tokens/embedding"], sd["model.decoder.embed_tokens.weight"])
    np.testing.assert_array_equal(params["embed_positions/embedding"], sd["model.decoder.embed_positions.weight"])
    np.testing.assert_array_equal(params["layers_1/fc1/kernel"], sd["model.decoder.layers.1.fc1.weight"].T)
    np.testing.assert_array_equal(params["layers_0/self_attn/q_proj/bias"], sd["model.decoder.layers.0.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(params["layers_1/self_attn_layer_norm/scale"],
                                  sd["model.decoder.layers.1.self_attn_layer_norm.weight"])
    # Tied or not, the head kernel is [Dw, V]: transformers' lm_head.weight transposed.
    np.testing.assert_array_equal(params["lm_head/kernel"], sd["lm_head.weight"].T)
    if hf.config.tie_word_embeddings:
        np.testing.assert_array_equal(params["lm_head/kernel"], sd["model.decoder.embed_tokens.weight"].T)
    else:
        assert not np.array_equal(sd["lm_head.weight"], sd["model.decoder.embed_tokens.weight"])
        np.testing.assert_array_equal(params["project_in/kernel"], sd["model.decoder.project_in.weight"].T)


@pytest.mark.parametrize("fmt", sorted(set(WRITERS) - {"safetensors"}))
def test_every_checkpoint_format_loads_the_same_params_as_safetensors(fmt: str, safetensors_params, tmp_path: Path) -> None:
    variant, expected = safetensors_params
    WRITERS[fmt](hf_for(variant), tmp_path)
    loaded = flat_params(load_ours(tmp_path)[1])
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert loaded[name].dtype == np.float32, name
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------------


def write_edited_safetensors(folder: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    hf = hf_model("pre_ln")
    hf.config.save_pretrained(folder)
    tensors = state_dict(hf)
    del tensors["lm_head.weight"]  # tied: as save_pretrained writes it
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))


def test_a_tensor_with_the_wrong_shape_is_an_error_naming_it(tmp_path: Path) -> None:
    name = "model.decoder.layers.1.fc1.weight"
    write_edited_safetensors(tmp_path, lambda t: t.__setitem__(name, t[name][:, :-1].copy()))
    with pytest.raises(ValueError, match=re.escape("decoder.layers.1.fc1.weight")):
        load_ours(tmp_path)


def test_a_missing_tensor_is_an_error_naming_it(tmp_path: Path) -> None:
    write_edited_safetensors(tmp_path, lambda t: t.pop("model.decoder.layers.0.self_attn.v_proj.bias"))
    with pytest.raises(KeyError, match=re.escape("decoder.layers.0.self_attn.v_proj.bias")):
        load_ours(tmp_path)


def test_a_folder_without_weights_is_an_error(tmp_path: Path) -> None:
    hf_model("pre_ln").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_ours(tmp_path)


# ---------------------------------------------------------------------------------------------------
# The parameter tables: checkpoint names and sharding rules cover every variant
# ---------------------------------------------------------------------------------------------------


def ours_and_theirs(variant: str) -> tuple[OPTConfig, dict[str, Any], dict[str, np.ndarray]]:
    """Our config and abstract params, and transformers' tensors by their checkpoint names."""
    hf = hf_model(variant)
    config = OPTConfig.from_hf(hf.config.to_dict())
    abstract = abstract_params(OPTForCausalLM(config, jnp.float32))
    ours = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    theirs = {k.removeprefix("model."): v for k, v in state_dict(hf).items()}
    return config, ours, theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tensor_plan_maps_every_param_to_a_checkpoint_tensor_of_its_shape_and_uses_them_all(variant: str) -> None:
    config, ours, theirs = ours_and_theirs(variant)
    used = set()
    for name, leaf in ours.items():
        plan = tensor_plan(name, config)
        assert plan.name in theirs, (name, plan)
        shape = theirs[plan.name].shape
        assert (shape[::-1] if plan.transpose else shape) == leaf.shape, (name, plan, shape)
        used.add(plan.name)
    # A tied head reads the embedding; transformers' copy of it under lm_head.weight is the one tensor left.
    assert used == set(theirs) - ({"lm_head.weight"} if config.tie_word_embeddings else set())


EXPECTED_SPECS: dict[str, P] = {
    "embed_tokens/embedding": P("mp", None),
    "embed_positions/embedding": P(),
    "project_in/kernel": P(),
    "project_out/kernel": P(),
    "lm_head/kernel": P(None, "mp"),
    "final_layer_norm/scale": P(),
    "layers_1/self_attn/q_proj/kernel": P(None, "mp"),
    "layers_1/self_attn/v_proj/bias": P("mp"),
    "layers_1/self_attn/out_proj/kernel": P("mp", None),
    "layers_1/self_attn/out_proj/bias": P(),
    "layers_1/fc1/kernel": P(None, "mp"),
    "layers_1/fc1/bias": P("mp"),
    "layers_1/fc2/kernel": P("mp", None),
    "layers_1/fc2/bias": P(),
    "layers_0/self_attn_layer_norm/bias": P(),
    "layers_0/final_layer_norm/scale": P(),
}


def test_partition_spec_covers_every_param_of_every_variant_with_a_spec_that_fits_its_rank() -> None:
    seen = set()
    for variant in VARIANTS:
        _, ours, _ = ours_and_theirs(variant)
        for name, leaf in ours.items():
            spec = partition_spec(name)
            assert len(spec) <= len(leaf.shape), (name, spec, leaf.shape)
            if name in EXPECTED_SPECS:
                assert spec == EXPECTED_SPECS[name], (variant, name, spec)
                seen.add(name)
    assert seen == set(EXPECTED_SPECS)  # the variants do reach project_in/out and the final LayerNorm


def test_partition_spec_of_an_unknown_parameter_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match=re.escape("layers_0/self_attn/rotary/kernel")):
        partition_spec("layers_0/self_attn/rotary/kernel")


# ---------------------------------------------------------------------------------------------------
# A vocabulary padded for the mesh: the checkpoint holds the real rows, the padding is zeros
# ---------------------------------------------------------------------------------------------------


def load_padded(folder: Path, vocab_multiple: int) -> dict[str, jax.Array]:
    """Our float32 model with its vocabulary padded to a multiple of `vocab_multiple`, loaded on two devices."""
    config = opt_utils.model_config(str(folder), None)
    model = OPTForCausalLM(config, jnp.float32, vocab_multiple=vocab_multiple)
    params = load_params(folder, model, make_mesh(jax.devices()[:2], config))
    return {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


# The tiny checkpoints hold 64 ids; each of the two devices holds half of the padded rows, so the second
# device's shard lies partly (rows 33..65) or wholly (rows 64..127) in the padding.
@pytest.mark.parametrize("vocab_multiple, second_shard_start", [(3, 33), (128, 64)], ids=["partly", "wholly"])
def test_a_checkpoint_loads_into_a_padded_model_as_the_unpadded_params_then_zeros(
    vocab_multiple: int, second_shard_start: int, safetensors_params, tmp_path: Path
) -> None:
    variant, expected = safetensors_params
    write_safetensors(hf_for(variant), tmp_path)
    loaded = load_padded(tmp_path, vocab_multiple)
    vocab = expected["embed_tokens/embedding"].shape[0]
    padded = -(-vocab // vocab_multiple) * vocab_multiple
    second = loaded["embed_tokens/embedding"].addressable_shards[1]
    assert second.index[0].start == second_shard_start
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        value = np.asarray(value)
        axis = VOCAB_AXES.get(name)
        if axis is not None:
            assert value.shape[axis] == padded, name
            np.testing.assert_array_equal(value.take(range(vocab, padded), axis=axis), 0.0, err_msg=name)
            value = value.take(range(vocab), axis=axis)
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize("name, edit", [
    ("decoder.layers.1.fc1.weight", lambda w: w[:, :-1]),
    # Rows for the padded vocabulary are no better: the checkpoint must hold the config's 64 ids.
    ("decoder.embed_tokens.weight", lambda w: np.pad(w, ((0, 2), (0, 0)))),
])
def test_a_tensor_with_the_wrong_shape_is_an_error_naming_it_when_loading_a_padded_model(
    name: str, edit: Callable[[np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    key = f"model.{name}"
    write_edited_safetensors(tmp_path, lambda t: t.__setitem__(key, np.ascontiguousarray(edit(t[key]))))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_padded(tmp_path, vocab_multiple=3)
