"""Continuous batching on rank 0: which request runs in which decode slot, one step at a time.

Requests wait in a FIFO queue. Before every decode step the scheduler admits waiting requests into
free slots (their prompts prefilled in length buckets), so a request waits for another only when
every slot is busy, and a finished request frees its slot for the next step. Each step is a
`Plan`: rank 0 publishes it (to the other ranks, through the group's channel) and runs it
on its own `SlotRunner`; every rank runs the same programs on the same plan.

The step's tokens are read one step late: step i+1 is dispatched before step i's tokens are fetched,
so the device never waits for the host's bookkeeping. A slot that finished in step i therefore runs
one more (frozen, unread) step before it is reused.

A request ends early when it is cancelled (its client went away) or its deadline passes: the
scheduler looks at both before planning every step, fails the request with a `DeadlineExceeded` or
`Cancelled` error and frees its slot for the next admission. The queue of waiting rows is bounded:
past `max_waiting` a submit is refused at once with `Overloaded`, and after `stop_accepting` (a drain)
with `Draining`.

`one_batch_at_a_time` is the original example's way, kept for comparison: a batch is admitted only
when every slot is empty, and runs until its last row ends.

Nothing here knows Triton, sockets or ranks: the server gives a `publish` callable and a runner.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from plan import Admission, Plan, PrefillGroup, Request, SlotShapes

LOGGER = logging.getLogger("engine")


class Refused(RuntimeError):
    """A request the engine will not queue; raised by `submit` at once, nothing was started."""


class Overloaded(Refused):
    """The queue of waiting rows is full: the client should retry later or elsewhere."""


class Draining(Refused):
    """The server is shutting down and takes no new requests."""


class DeadlineExceeded(TimeoutError):
    """A request ran past its deadline; its slot is freed."""


class Cancelled(RuntimeError):
    """A request nobody waits for any more (its client disconnected); its slot is freed."""


class ShuttingDown(RuntimeError):
    """A request still running when a drain's grace period ended."""


@dataclasses.dataclass(frozen=True)
class Ended:
    """A row's end, as the metrics hear of it."""

    api: str  # the front end it came through: "triton" or "openai"
    outcome: str  # "ok", "timeout" (past its deadline), "cancelled" (its client went away, a drain ended), "error"
    tokens: int  # generated and kept (an EOS is not)
    seconds: float  # from its arrival to its end
    seconds_per_token: float | None = None  # an ok row's mean gap between its tokens after the first
    reason: str | None = None  # an ok row's: "stop" (it met EOS) or "length" (it reached its output length)


class Metrics(Protocol):
    """What the scheduler reports, per front end (`api`); `PrometheusMetrics` exports it, `NO_METRICS` drops it."""

    def first_token(self, api: str, seconds: float) -> None: ...

    def token(self, api: str, gap: float | None) -> None:
        """One generated token kept; `gap`: seconds since the row's previous one (None for its first)."""

    def finished(self, ended: Ended) -> None: ...

    def admitted(self, api: str, prompt_tokens: int) -> None:
        """A row went into a decode slot: its prompt is prefilled in this step."""

    def load(self, waiting: Mapping[str, int], running: Mapping[str, int]) -> None:
        """Rows waiting for a slot and rows in one, per api, after every step."""

    def refused(self, api: str, rows: int, reason: str) -> None: ...


class _NoMetrics:
    def first_token(self, api: str, seconds: float) -> None:
        pass

    def token(self, api: str, gap: float | None) -> None:
        pass

    def finished(self, ended: Ended) -> None:
        pass

    def admitted(self, api: str, prompt_tokens: int) -> None:
        pass

    def load(self, waiting: Mapping[str, int], running: Mapping[str, int]) -> None:
        pass

    def refused(self, api: str, rows: int, reason: str) -> None:
        pass


NO_METRICS: Metrics = _NoMetrics()


class Runner(Protocol):
    """What the scheduler needs of runner.SlotRunner: the engine itself never touches a device array."""

    shapes: SlotShapes

    def run(self, plan: Plan) -> Any:
        """Dispatches the step; returns its output, still on the devices."""
        ...

    def read(self, output: Any) -> tuple[list[np.ndarray], np.ndarray]:
        """A step's tokens on the host: each prefill group's first tokens [b], then every slot's [S]."""
        ...


@dataclasses.dataclass(eq=False)
class InFlight:
    """A request in flight: its tokens so far, and who hears of them."""

    request: Request
    on_token: Callable[[int], None] | None  # called in the scheduler's thread for every new token: keep it cheap
    eos_id: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    tokens: list[int] = dataclasses.field(default_factory=list)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which the request fails with DeadlineExceeded
    first_token_at: float | None = None
    last_token_at: float | None = None
    api: str = "triton"  # the front end it came through, for the metrics
    finished: bool = False
    # add (the engine's thread) and fail (any thread: an abort, a drain's end) change the sequence under this
    # lock, so that no token reaches `on_token` after the future is done (a stream's end).
    _lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)

    def add(self, token: int, now: float, metrics: Metrics) -> None:
        """One generated token; EOS (unless ignored) or the output length ends the sequence."""
        with self._lock:
            self._add(token, now, metrics)

    def _add(self, token: int, now: float, metrics: Metrics) -> None:
        if self.finished:
            return
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.first_token(self.api, now - self.submitted)
        if token == self.eos_id and not self.request.sampling.ignore_eos:
            self.finish(now, metrics, eos=True)
            return
        self.tokens.append(token)
        metrics.token(self.api, None if self.last_token_at is None else now - self.last_token_at)
        self.last_token_at = now
        if self.on_token is not None:
            try:
                self.on_token(token)
            except Exception as error:  # its listener is gone (e.g. a stopped event loop): nobody to generate for
                self.fail(Cancelled(f"the request's listener failed: {error}"), metrics, "cancelled")
                return
        if len(self.tokens) >= self.request.max_new_tokens:
            self.finish(now, metrics)

    def finish(self, now: float, metrics: Metrics, *, eos: bool = False, reason: str | None = None) -> None:
        """The sequence's end: `now` is when its last token came (the EOS, when `eos`, which is not kept).

        `reason`: why it ended, for the metrics; by default "stop" for an EOS and "length" otherwise.
        """
        with self._lock:
            if self.finished:
                return
            self.finished = True
            n = len(self.tokens)
            # The gaps between the generated tokens after the first: an EOS is one of them.
            gaps = n - 1 + int(eos)
            per_token = (now - self.first_token_at) / gaps if self.first_token_at is not None and gaps > 0 else None
            metrics.finished(Ended(self.api, "ok", n, now - self.submitted, per_token,
                                   reason or ("stop" if eos else "length")))
            if not self.future.done():
                self.future.set_result(list(self.tokens))

    def fail(self, error: BaseException, metrics: Metrics, outcome: str = "error") -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
            metrics.finished(Ended(self.api, outcome, len(self.tokens), time.monotonic() - self.submitted))
            if not self.future.done():  # asyncio.wrap_future cancels it when its awaiting task is cancelled
                self.future.set_exception(error)


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose tokens have not been read yet."""

    plan: Plan
    occupants: list[InFlight | None]  # slot -> its sequence when the step was planned
    output: Any  # the runner's, read a step later


class Scheduler:
    """Admits requests into slots and runs the engine step by step (`run` in a thread, or `generate`)."""

    def __init__(self, runner: Runner, *, eos_id: int, one_batch_at_a_time: bool = False,
                 publish: Callable[[Plan], None] = lambda plan: None, metrics: Metrics = NO_METRICS,
                 max_waiting: int | None = None):
        self._runner = runner
        self.shapes = runner.shapes
        self._eos_id = eos_id
        self._one_batch = one_batch_at_a_time
        self._publish = publish
        self._metrics = metrics
        self._max_waiting = max_waiting  # rows; None: unbounded
        self._waiting: collections.deque[InFlight] = collections.deque()
        # Ends asked for by other threads, done before a step: the error a row fails with, or None to finish it
        # with the tokens it has.
        self._ending: list[tuple[InFlight, BaseException | None]] = []
        self._refusal: Refused | None = None  # set by stop_accepting
        self._wake = threading.Condition()
        self._slots: list[InFlight | None] = [None] * self.shapes.slots
        self._first_valid = np.zeros(self.shapes.slots, np.int64)  # host copy, per slot
        self._column = 0  # host copy of the runner's column
        self._pending: _Pending | None = None
        self.failure: BaseException | None = None

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, request: Request, on_token: Callable[[int], None] | None = None, *,
               timeout: float | None = None) -> InFlight:
        """Queues a request; its future gets the generated tokens (EOS excluded), or the error that ended it."""
        return self.submit_all([request], on_token, timeouts=[timeout])[0]

    def submit_all(self, requests: Sequence[Request], on_token: Callable[[int], None] | None = None, *,
                   timeouts: Sequence[float | None] | None = None,
                   listeners: Sequence[Callable[[int], None] | None] | None = None,
                   api: str = "triton") -> list[InFlight]:
        """Queues the rows of one client request together: all of them, or none (an error says why).

        `timeouts`: per row, seconds from now after which it fails with DeadlineExceeded (None: never).
        `listeners`: per row, its own `on_token` (a stream of several rows), in place of the shared one.
        `api`: the front end the rows came through ("triton", "openai"), which the metrics are labelled by.
        """
        if self.failure is not None:
            raise RuntimeError(f"the generation engine failed: {self.failure}")
        for request in requests:
            needed = len(request.tokens) + request.max_new_tokens
            if needed > self.shapes.max_positions:
                raise ValueError(f"prompt of {len(request.tokens)} tokens plus {request.max_new_tokens} new ones "
                                 f"exceeds the model's {self.shapes.max_positions} positions")
        now = time.monotonic()
        timeouts = timeouts if timeouts is not None else [None] * len(requests)
        listeners = listeners if listeners is not None else [on_token] * len(requests)
        sequences = [InFlight(r, listen, self._eos_id, submitted=now, deadline=None if t is None else now + t, api=api)
                     for r, t, listen in zip(requests, timeouts, listeners, strict=True)]
        with self._wake:
            if self._refusal is not None:
                self._metrics.refused(api, len(sequences), "draining")
                raise self._refusal
            # Rows submitted since the last step wait for slots that may be free: only those beyond count.
            free = sum(s is None for s in self._slots)
            queued = max(0, len(self._waiting) - free)
            if self._max_waiting is not None and len(self._waiting) + len(sequences) - free > self._max_waiting:
                self._metrics.refused(api, len(sequences), "overloaded")
                raise Overloaded(f"overloaded: {queued} rows already wait for a decode slot and the queue holds "
                                 f"{self._max_waiting} (--max-queue-size); retry later")
            self._waiting.extend(sequences)
            self._wake.notify()
        return sequences

    def cancel(self, sequence: InFlight, error: BaseException) -> None:
        """Ends a request from any thread: it fails with `error` and its slot is freed before the next step."""
        self._end_before_next_step(sequence, error)

    def end_early(self, sequence: InFlight) -> None:
        """Ends a request from any thread as finished with the tokens it has (its front end met a stop string):
        its future gets them, the metrics count it as ended on "stop", and its slot is freed before the next step."""
        self._end_before_next_step(sequence, None)

    def _end_before_next_step(self, sequence: InFlight, error: BaseException | None) -> None:
        with self._wake:
            self._ending.append((sequence, error))
            self._wake.notify()

    def stop_accepting(self, refusal: Refused) -> None:
        """From now on every submit raises `refusal`; what was queued or running carries on (a drain)."""
        with self._wake:
            self._refusal = refusal

    @property
    def accepting(self) -> bool:
        """Whether a submit would be taken now (no drain, no failure): what readiness reports."""
        return self._refusal is None and self.failure is None

    @property
    def in_flight(self) -> int:
        """Rows queued or running (read from any thread: a moment's snapshot)."""
        return len(self._waiting) + sum(s is not None for s in self._slots)

    def abort(self, error: BaseException) -> None:
        """Fails every waiting and running request at once (a lost peer: nothing will finish)."""
        self.failure = error
        with self._wake:
            doomed = [*self._waiting, *(s for s in self._slots if s is not None)]
            self._waiting.clear()
            self._wake.notify_all()
        for sequence in doomed:
            sequence.fail(error, self._metrics)

    def cancel_all(self, error: BaseException) -> None:
        """Ends every queued and running request with `error` before the next step (a drain's grace is over)."""
        with self._wake:
            for sequence in [*self._waiting, *(s for s in self._slots if s is not None)]:
                self._ending.append((sequence, error))
            self._wake.notify()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self._slots) or self._pending is not None

    # -- running -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Steps while there is work; sleeps until a request comes; returns once `stop` is set and all is done."""
        while True:
            try:
                worked = self.step()
            except Exception as error:  # a device or peer failure: every request hears of it
                LOGGER.exception("generation failed")
                self.abort(error)
                return
            if worked:
                continue
            if stop.is_set():
                return
            with self._wake:
                if not self._waiting:
                    self._wake.wait(timeout=0.5)

    def generate(self, requests: Sequence[Request]) -> list[list[int]]:
        """Runs the requests to the end in this thread (tests, benchmarks): each one's tokens, EOS excluded."""
        sequences = [self.submit(r) for r in requests]
        while self.step():
            pass
        return [s.future.result() for s in sequences]

    def step(self) -> bool:
        """Plans and dispatches one step, then reads the previous one. False when there was nothing to do."""
        plan = self._plan()
        pending = None
        if plan is not None:
            occupants = list(self._slots)
            self._publish(plan)
            pending = _Pending(plan, occupants, self._runner.run(plan))
        previous, self._pending = self._pending, pending
        if previous is not None:
            self._collect(previous)
        self._report_load()
        return plan is not None or previous is not None

    def _report_load(self) -> None:
        with self._wake:  # other threads extend the queue
            waiting = collections.Counter(s.api for s in self._waiting)
        self._metrics.load(waiting, collections.Counter(s.api for s in self._slots if s is not None))

    # -- planning ----------------------------------------------------------------------------------
    def _plan(self) -> Plan | None:
        self._retire(time.monotonic())
        admitted = self._admit()
        live = [s for s, seq in enumerate(self._slots) if seq is not None]
        if not live:
            return None
        groups = self._groups(admitted)
        column, shift = self._column, 0
        old = [s for s in live if s not in admitted]
        if column >= self.shapes.columns:  # no room for the next token: drop the columns nobody reads
            shift = max(0, min(int(self._first_valid[old].min()) if old else column, column))
        longest = max((g.prompt_bucket for g in groups), default=0)
        shift = min(shift, column - longest)  # roll right when the new prompts need more columns before t
        self._first_valid -= shift
        t = column - shift
        for slot, sequence in admitted.items():
            self._first_valid[slot] = t - len(sequence.request.tokens)
        # A row is read a step late, so a finished one can still count as live here, one column past
        # the positions; the window leaves out only such rows' oldest column, which nobody reads.
        window = self.shapes.window(min(t - int(self._first_valid[live].min()) + 1, self.shapes.max_positions))
        self._column = t + 1
        sampling = any(not self._slots[s].request.sampling.greedy for s in live)
        rows = self.shapes.decode_batch(live[-1] + 1)  # admissions take the lowest free slots: live rows pack low
        return Plan(column=column, shift=shift, groups=groups, window=window, rows=rows, sampling=sampling,
                    moves=bool(old))  # with no earlier row live, no column is read again: nothing to move

    def _retire(self, now: float) -> None:
        """Fails the cancelled requests and those past their deadline, finishes those ended early; frees their
        queue places and slots.

        A freed slot's row keeps running on the devices until a new admission overwrites it; its tokens
        are read and ignored (the sequence is finished), as for a row that ended by itself.
        """
        with self._wake:
            ending, self._ending = self._ending, []
            for sequence in [*self._waiting, *(s for s in self._slots if s is not None)]:
                if sequence.deadline is not None and now >= sequence.deadline:
                    ending.append((sequence, DeadlineExceeded(
                        f"timed out: the request's deadline of {sequence.deadline - sequence.submitted:.3g} s passed "
                        f"after {len(sequence.tokens)} of {sequence.request.max_new_tokens} tokens")))
            for sequence, error in ending:
                if sequence in self._waiting:
                    self._waiting.remove(sequence)
        for sequence, error in ending:
            if error is None:
                sequence.finish(sequence.last_token_at or now, self._metrics, reason="stop")
            else:
                sequence.fail(error, self._metrics, "timeout" if isinstance(error, DeadlineExceeded) else "cancelled")
            for slot, occupant in enumerate(self._slots):
                if occupant is sequence:
                    self._slots[slot] = None

    def _admit(self) -> dict[int, InFlight]:
        """Moves waiting requests into free slots; returns slot -> sequence for those admitted.

        In arrival order, within a budget of padded prompt tokens per step (which bounds how long
        prefills pause the running rows); a prompt over what is left of the budget waits while shorter
        ones behind it go in. The oldest request always goes in first, so none waits for ever.
        """
        free = [s for s, seq in enumerate(self._slots) if seq is None]
        if self._one_batch and len(free) < len(self._slots):
            return {}  # the original's way: the running batch ends before another starts
        admitted: dict[int, InFlight] = {}
        budget = self.shapes.prefill_tokens
        with self._wake:
            for sequence in list(self._waiting):
                if not free:
                    break
                cost = self.shapes.prompt_bucket(len(sequence.request.tokens))
                if admitted and cost > budget and not self._one_batch:
                    continue
                budget -= cost
                slot = free.pop(0)
                admitted[slot] = self._slots[slot] = sequence
                self._waiting.remove(sequence)
        for sequence in admitted.values():
            self._metrics.admitted(sequence.api, len(sequence.request.tokens))
        return admitted

    def _groups(self, admitted: dict[int, InFlight]) -> tuple[PrefillGroup, ...]:
        """The admitted requests in prefill calls: same prompt bucket together, up to its compiled row counts."""
        by_bucket: dict[int, list[Admission]] = collections.defaultdict(list)
        for slot, sequence in admitted.items():
            by_bucket[self.shapes.prompt_bucket(len(sequence.request.tokens))].append(Admission(slot, sequence.request))
        groups = []
        for bucket, admissions in sorted(by_bucket.items()):
            most = self.shapes.prefill_rows(bucket)[-1]
            for i in range(0, len(admissions), most):
                part = tuple(admissions[i : i + most])
                groups.append(PrefillGroup(self.shapes.prefill_batch(len(part), bucket), bucket, part))
        return tuple(groups)

    # -- reading a step's tokens -------------------------------------------------------------------
    def _collect(self, pending: _Pending) -> None:
        firsts, tokens = self._runner.read(pending.output)
        now = time.monotonic()
        for group, first in zip(pending.plan.groups, firsts):
            for admission, token in zip(group.admissions, np.asarray(first)):
                pending.occupants[admission.slot].add(int(token), now, self._metrics)
        for slot, sequence in enumerate(pending.occupants):
            if sequence is not None:
                sequence.add(int(tokens[slot]), now, self._metrics)
                if sequence.finished and self._slots[slot] is sequence:
                    self._slots[slot] = None


@dataclasses.dataclass
class EngineThread:
    """Rank 0's scheduler, stepping in a thread of its own."""

    scheduler: "Scheduler"
    thread: threading.Thread
    stopping: threading.Event

    @classmethod
    def start(cls, scheduler: "Scheduler") -> "EngineThread":
        stopping = threading.Event()
        thread = threading.Thread(target=scheduler.run, args=(stopping,), name="engine", daemon=True)
        thread.start()
        return cls(scheduler, thread, stopping)

    def stop(self, timeout: float) -> None:
        """Returns once the scheduler ran its last step (it finishes what it holds first), or after `timeout`."""
        self.stopping.set()
        self.thread.join(timeout)


DRAIN_HANDOVER_S = 1.0  # after the engine's last token: time for the callables to hand their responses to Triton


def drain(scheduler: Scheduler, grace: float) -> None:
    """SIGTERM's way out: new requests are refused; those in flight get `grace` seconds, then are ended."""
    scheduler.stop_accepting(Draining("the server is shutting down (draining after SIGTERM) and takes no "
                                      "new requests: send it to another replica"))
    LOGGER.info("draining: %d rows in flight get up to %g s to finish (--exit-timeout)", scheduler.in_flight, grace)
    if not wait_idle(scheduler, grace):
        LOGGER.warning("drain: %d rows still in flight after %g s: ending them", scheduler.in_flight, grace)
        scheduler.cancel_all(ShuttingDown(f"shutting down: the request did not finish within the drain's "
                                          f"grace period of {grace:g} s (--exit-timeout)"))
        wait_idle(scheduler, 5.0)
    time.sleep(DRAIN_HANDOVER_S)
    LOGGER.info("drained")


def wait_idle(scheduler: Scheduler, timeout: float) -> bool:
    """Whether the engine ran out of rows within `timeout` seconds (or failed: nothing more will finish)."""
    deadline = time.monotonic() + timeout
    while scheduler.in_flight and scheduler.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return not scheduler.in_flight or scheduler.failure is not None
