"""The wire format of a step and the key-value channel that carries it from rank 0 to every other rank.

Every key this server keeps in the coordination service's key-value store starts with KEY_PREFIX.
Nothing here imports jax: the channel talks to jax.distributed's client object it is given.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from plan import Admission, Plan, PrefillGroup, Request, Sampling
from protocol import OPTIONAL_INPUTS, OptionalInput

KEY_PREFIX = "opt-server/"  # every key this server keeps in the coordination service's key-value store
RECEIVE_POLL_MS = 500  # how often a waiting worker looks up from the channel to check for signals


class GroupError(RuntimeError):
    """The group cannot form, or lost a rank: every rank exits non-zero so that an orchestrator restarts it."""


WIRE_FORMAT = 4
KIND_STOP, KIND_STEP = 0, 1
HEADER_WORDS = 11  # format, kind, column, shift, moves, window, decode rows, sampling, groups, rows, tokens
GROUP_WORDS = 3  # compiled rows, prompt bucket, admissions
ROW_HEAD_WORDS = 3  # slot, prompt length, max new tokens; then each sampling input's words
SAMPLING_INPUTS: tuple[OptionalInput, ...] = tuple(o for o in OPTIONAL_INPUTS if o.sampling)


def setting_words(option: OptionalInput) -> int:
    """32-bit words one value of `option` takes: its bytes, a bool taking a whole word."""
    return max(1, np.dtype(option.dtype).itemsize // 4)


ROW_WORDS = ROW_HEAD_WORDS + sum(map(setting_words, SAMPLING_INPUTS))  # 9: seed is two words


def encode_plan(plan: Any | None) -> bytes:
    """One channel message: a plan.Plan, or None for "stop".

    Wire format, little-endian 32-bit words, nothing pickled:
        HEADER_WORDS: WIRE_FORMAT, kind (KIND_STEP or KIND_STOP), column, shift, moves (0 or 1), window,
            decode rows, sampling (0 or 1), G groups, R rows, N tokens
        G x GROUP_WORDS: each prefill group's compiled row count, prompt bucket and number of admissions
        R x ROW_WORDS: each admitted row, in group order: slot, prompt length, max new tokens, then each
            sampling input of protocol.OPTIONAL_INPUTS in the table's order (temperature, top_k, top_p,
            seed, ignore_eos): float32 as its bits, int32 and bool as one word, int64 (the seed) as its
            low and high words
        N words: the rows' prompt token ids, concatenated in row order
    """
    if plan is None:
        return np.asarray([WIRE_FORMAT, KIND_STOP] + [0] * (HEADER_WORDS - 2), dtype="<i4").tobytes()
    admissions = [a for g in plan.groups for a in g.admissions]
    rows = np.zeros((len(admissions), ROW_WORDS), dtype="<i4")
    for i, a in enumerate(admissions):
        settings = [w for o in SAMPLING_INPUTS for w in _setting_to_words(o, getattr(a.request.sampling, o.name))]
        rows[i] = [a.slot, len(a.request.tokens), a.request.max_new_tokens, *settings]
    tokens = [t for a in admissions for t in a.request.tokens]
    header = [WIRE_FORMAT, KIND_STEP, plan.column, plan.shift, int(plan.moves), plan.window, plan.rows,
              int(plan.sampling), len(plan.groups), len(admissions), len(tokens)]
    groups = [w for g in plan.groups for w in (g.rows, g.prompt_bucket, len(g.admissions))]
    return np.concatenate([np.asarray(header + groups, "<i4"), rows.reshape(-1), np.asarray(tokens, "<i4")]).tobytes()


def _setting_to_words(option: OptionalInput, value: object) -> list[int]:
    typed = np.asarray(value, np.dtype(option.dtype).newbyteorder("<"))
    if typed.dtype.itemsize < 4:  # bool
        return [int(typed)]
    return np.frombuffer(typed.tobytes(), "<i4").tolist()


def _setting_from_words(option: OptionalInput, words: np.ndarray) -> object:
    dtype = np.dtype(option.dtype).newbyteorder("<")
    if dtype.itemsize < 4:
        return np.asarray(words[0]).astype(dtype).item()
    return np.frombuffer(np.ascontiguousarray(words, "<i4").tobytes(), dtype)[0].item()


def _sampling_from_words(words: np.ndarray) -> Sampling:
    values, at = {}, 0
    for option in SAMPLING_INPUTS:
        values[option.name] = _setting_from_words(option, words[at : at + setting_words(option)])
        at += setting_words(option)
    return Sampling(**values)


def decode_plan(message: bytes) -> Any | None:
    """The inverse of `encode_plan`; a message that does not follow the format is a GroupError."""
    if len(message) % 4:
        raise GroupError(f"channel message of {len(message)} bytes is not made of 32-bit words (truncated?)")
    words = np.frombuffer(message, dtype="<i4")
    if len(words) < HEADER_WORDS or words[0] != WIRE_FORMAT or words[1] not in (KIND_STOP, KIND_STEP):
        raise GroupError(f"malformed channel message (header {words[:HEADER_WORDS].tolist()}); "
                         "are all ranks the same version?")
    column, shift, moves, window, decode_rows, sampling, n_groups, n_rows, n_tokens = (
        int(w) for w in words[2:HEADER_WORDS])
    rows_at = HEADER_WORDS + GROUP_WORDS * n_groups
    tokens_at = rows_at + ROW_WORDS * n_rows
    if min(n_groups, n_rows, n_tokens) < 0 or len(words) != tokens_at + n_tokens:
        raise GroupError(f"channel message of {len(words)} words does not hold {n_groups} groups, {n_rows} rows "
                         f"and {n_tokens} tokens")
    if words[1] == KIND_STOP:
        return None
    groups_words = words[HEADER_WORDS:rows_at].reshape(n_groups, GROUP_WORDS)
    rows = words[rows_at:tokens_at].reshape(n_rows, ROW_WORDS)
    if int(groups_words[:, 2].sum()) != n_rows or int(rows[:, 1].sum()) != n_tokens:
        raise GroupError("channel message: its groups, rows and tokens do not add up")
    tokens, starts = words[tokens_at:], np.concatenate([[0], np.cumsum(rows[:, 1])])
    admissions = []
    for i, r in enumerate(rows):
        settings = _sampling_from_words(r[ROW_HEAD_WORDS:])
        request = Request(tuple(int(t) for t in tokens[starts[i] : starts[i + 1]]), int(r[2]), settings)
        admissions.append(Admission(int(r[0]), request))
    groups, first = [], 0
    for b, bucket, count in groups_words.tolist():
        groups.append(PrefillGroup(b, bucket, tuple(admissions[first : first + count])))
        first += count
    return Plan(column=column, shift=shift, groups=tuple(groups), window=window, rows=decode_rows,
                sampling=bool(sampling), moves=bool(moves))


INTERRUPTED = object()  # Channel.receive's answer when its wait was cut short, not a message


class Channel:
    """Rank 0 to every other rank, one message per engine step, in order: the only data that crosses ranks.

    Message i lives under the key `opt-server/step/<i>` of the coordination service that
    jax.distributed runs in rank 0's process; workers wait on it with a blocking get. A step's key is
    deleted when the one after next is sent: rank 0 has read that step's tokens by then, so every rank
    has run its collectives, and so every rank has read it.
    """

    def __init__(self, client: Any):
        self._client = client
        self._sent = 0
        self._received = 0

    def _key(self, index: int) -> str:
        return f"{KEY_PREFIX}step/{index}"

    def send(self, plan: Any | None) -> None:
        """Rank 0: the next step for every worker (None tells them to stop)."""
        self._client.key_value_set_bytes(self._key(self._sent), encode_plan(plan))
        if self._sent >= 2:
            self._client.key_value_delete(self._key(self._sent - 2))
        self._sent += 1

    def receive(self, stop: threading.Event) -> Any:
        """Workers: the next step; None when rank 0 says stop; INTERRUPTED once `stop` is set."""
        message = await_key(self._client, self._key(self._received), stop)
        if message is None:
            return INTERRUPTED
        self._received += 1
        return decode_plan(message)


def await_key(client: Any, key: str, stop: threading.Event | None = None) -> bytes | None:
    """Waits for `key` in the key-value store and returns its value; None once `stop` is set.

    The wait is cut into RECEIVE_POLL_MS slices so that `stop` and signals are seen. A store that does
    not answer at all (rank 0 gone) is retried at that pace too, not in a busy loop: the peer monitor
    ends the process then.
    """
    while stop is None or not stop.is_set():
        try:
            return client.blocking_key_value_get_bytes(key, RECEIVE_POLL_MS)
        except Exception as error:  # not there yet (the deadline passed), or the store is unreachable
            if "DEADLINE_EXCEEDED" not in str(error):
                time.sleep(RECEIVE_POLL_MS / 1000)
    return None
