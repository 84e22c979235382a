"""Tiny transformers (PyTorch) OPT models, one per architecture variant, and our model loaded from their checkpoints.

Not a test module: test_modeling.py and test_checkpoints.py share these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import opt_utils
from sharding import make_mesh
from weights import load_params
from modeling_flax_opt import OPTForCausalLM

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=32,
            max_position_embeddings=32, init_std=0.2)

# The architecture switches the facebook/opt-* checkpoints use, each on top of TINY.
VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": {},
    "post_ln_projections": dict(do_layer_norm_before=False, word_embed_proj_dim=8),  # opt-350m style
    "no_final_layer_norm": dict(_remove_final_layer_norm=True),
    "no_bias_no_affine_gelu": dict(enable_bias=False, layer_norm_elementwise_affine=False, activation_function="gelu"),
    "untied_head": dict(tie_word_embeddings=False),
}


def hf_model(variant: str, *, seed: int = 0, **overrides: Any) -> transformers.OPTForCausalLM:
    """A float32 transformers OPT with random weights; every tensor, LayerNorms and biases included, is non-trivial."""
    torch.manual_seed(seed)
    config = transformers.OPTConfig(**{**TINY, **VARIANTS[variant], **overrides})
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        # LayerNorms start at scale 1 / bias 0 and Linear biases at 0: a mix-up among them would go unseen.
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model: transformers.OPTForCausalLM, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[B, T] tokens -> [B, T, V] float32 logits of every position."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def state_dict(model: transformers.OPTForCausalLM) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load_ours(folder: Path) -> tuple[OPTForCausalLM, Any]:
    """Our float32 model and params from a checkpoint folder, through the path the server takes."""
    config = opt_utils.model_config(str(folder), None)
    model = OPTForCausalLM(config, jnp.float32)
    mesh = make_mesh(jax.devices()[:1], config)
    return model, load_params(Path(folder), model, mesh)
