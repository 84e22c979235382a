"""The contract between the server and its clients: the Triton model names and the one table of optional
per-row inputs (name, dtypes, default, accepted range, client flag).

Every layer derives its view from `OPTIONAL_INPUTS`: the server's Triton inputs and its checks
(`triton_models`), the client's flags and `Settings` (`client.py`), the words a row's sampling takes on
the wire between ranks (`channel.py`) and the benchmarks' requests. Imports nothing of ours and no jax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

MODEL_NAME = "OPT"
STREAM_MODEL_NAME = "OPT_stream"
MAX_TEMPERATURE = 100.0
MAX_TIMEOUT_S = 86400.0
VOCAB = "the vocabulary size"  # a bound that is the served model's: resolved by `OptionalInput.problem`


@dataclasses.dataclass(frozen=True)
class OptionalInput:
    """A per-row input a request may leave out (Triton shape [B, 1]), and what it accepts."""

    name: str
    dtype: type  # numpy dtype of the Triton tensor
    triton_dtype: str  # its Triton datatype name
    default: Any  # what a row that leaves it out gets; None: nothing (seed: drawn; timeout: none)
    low: float | None = None  # accepted range; None: unbounded on that side
    high: float | str | None = None  # VOCAB: the served model's vocabulary size
    low_open: bool = False  # low itself is refused
    sampling: bool = True  # part of how tokens are picked: travels to every rank with the row
    note: str = ""  # added to the message of a refused value
    flag: str = ""  # client.py's flag (default: --name with dashes)
    help: str = ""

    @property
    def client_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, value: Any, *, vocab_size: int) -> str | None:
        """What is wrong with `value` for this input, or None."""
        if self.dtype is np.bool_ or self.low is None:
            return None
        high = vocab_size if self.high == VOCAB else self.high
        low_ok = value > self.low if self.low_open else value >= self.low
        if math.isfinite(float(value)) and low_ok and (high is None or value <= high):
            return None
        bound = f" and <= {high:g}" if high is not None else ""
        return f"must be {'>' if self.low_open else '>='} {self.low:g}{bound}{self.note}"


OPTIONAL_INPUTS: tuple[OptionalInput, ...] = (
    OptionalInput("temperature", np.float32, "FP32", 0.0, 0.0, MAX_TEMPERATURE,
                  help="sampling temperature (server default 0: greedy)"),
    OptionalInput("top_k", np.int32, "INT32", 0, 0, VOCAB, note=" (0: off)",
                  help="sample among the k likeliest tokens (0: off)"),
    OptionalInput("top_p", np.float32, "FP32", 1.0, 0.0, 1.0, low_open=True,
                  help="nucleus sampling mass in (0, 1] (1: off)"),
    OptionalInput("seed", np.int64, "INT64", None, 0, help="sampling seed (>= 0): same seed, same text"),
    OptionalInput("ignore_eos", np.bool_, "BOOL", False,
                  help="keep generating past the end-of-sequence token (benchmarks)"),
    OptionalInput("timeout_seconds", np.float32, "FP32", None, 0.0, MAX_TIMEOUT_S, low_open=True, sampling=False,
                  flag="--deadline", help="seconds the server may spend on the request (its input timeout_seconds); "
                                          "past them it answers with a 'timed out' error and frees the request's slot"),
)
OPTIONAL_BY_NAME: dict[str, OptionalInput] = {o.name: o for o in OPTIONAL_INPUTS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A client's optional inputs, one field per `OPTIONAL_INPUTS` entry (a test holds them equal). A field
    left None is not sent at all, so the server's default applies and a server that predates an input never
    sees it."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    timeout_seconds: float | None = None

    def given(self) -> dict[str, Any]:
        """The settings to send, by input name, in the table's order."""
        return {o.name: getattr(self, o.name) for o in OPTIONAL_INPUTS if getattr(self, o.name) is not None}
