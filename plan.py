"""What the scheduler hands the devices each step, as plain data (no jax): requests, their sampling,
the shapes every program is compiled for, and the step plan that rank 0 decides and every rank runs."""
from __future__ import annotations

import dataclasses

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



def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed as (low, high) uint32 words."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
