"""The contract between the server and its clients: the Triton model names and the one table of
optional per-row inputs (name, dtype, default, accepted range). Imports nothing of ours and no jax."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

MODEL_NAME = "OPT"
STREAM_MODEL_NAME = "OPT_stream"
MAX_TEMPERATURE = 100.0
MAX_TIMEOUT_S = 86400.0


@dataclasses.dataclass(frozen=True)
class OptionalInput:
    """A per-row Triton input a request may leave out; `check` names what is wrong with a value, or None."""

    name: str
    dtype: Any
    default: Any
    check: Callable[[Any], str | None]


def _finite_between(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        low_ok = value > lo if lo_open else value >= lo
        if not (np.isfinite(value) and low_ok and value <= hi):
            return f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        return None
    return check


def optional_inputs(vocab_size: int) -> tuple[OptionalInput, ...]:
    """The per-row optional inputs: sampling (none of them: greedy decoding) and the row's deadline."""
    return (
        OptionalInput("temperature", np.float32, 0.0, _finite_between(0.0, MAX_TEMPERATURE)),
        OptionalInput("top_k", np.int32, 0,
                      lambda v: None if 0 <= v <= vocab_size else f"must be >= 0 and <= {vocab_size} (0: off)"),
        OptionalInput("top_p", np.float32, 1.0, _finite_between(0.0, 1.0, lo_open=True)),
        OptionalInput("seed", np.int64, None, lambda v: None if v >= 0 else "must be >= 0"),
        OptionalInput("ignore_eos", np.bool_, False, lambda v: None),
        OptionalInput("timeout_seconds", np.float32, None, _finite_between(0.0, MAX_TIMEOUT_S, lo_open=True)),
    )
