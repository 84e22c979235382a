"""The continuous-batching scheduler on random/tiny: every row equals naive greedy full forward passes, however
requests come and go, with the cache shifting both ways; nothing compiles after warm-up; seeded sampling."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opt_utils
from sharding import make_mesh, param_shardings
from weights import abstract_params
import engine as engine_module
from engine import InFlight, Scheduler
from modeling_flax_opt import KVCache, OPTForCausalLM
from plan import Admission, Plan, PrefillGroup, Request, Sampling, SlotShapes
from runner import SlotRunner
from sharding import path_name

# Every backend compile in this process, by function name (JAX reports each one, from its persistent
# cache or not, under this event).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILED: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: COMPILED.append(str(kwargs.get("fun_name"))) if event == BACKEND_COMPILE else None)


@pytest.fixture(scope="module")
def tiny() -> SlotRunner:
    """random/tiny with 64 positions, float32, random weights, in 4 slots; chunk 16, 64 prefill tokens a step."""
    config = dataclasses.replace(opt_utils.random_config("random/tiny"), max_position_embeddings=64)
    model = OPTForCausalLM(config, jnp.float32)
    mesh = make_mesh(jax.devices()[:1], config)
    # Weights of std 0.2 (LayerNorm scales about 1), ten times OPT's init, so that greedy output varies
    # instead of repeating one token; drawn by numpy, as compiling jax's random init costs seconds.
    rng = np.random.default_rng(0)
    draw = lambda path, a: rng.normal(1.0 if path_name(path).endswith("scale") else 0.0, 0.2, a.shape)
    abstract = abstract_params(model)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a, sharding: jax.device_put(draw(path, a).astype(np.float32), sharding),
        abstract, param_shardings(abstract, mesh))
    shapes = SlotShapes.make(slots=4, max_positions=64, chunk=16, prefill_tokens=64)
    # Prompts of up to 16, 32 or 64 tokens; 4, 2 or 1 of them prefilled at once; one window; 96 columns.
    assert shapes.prefill_shapes() == [(1, 16), (2, 16), (4, 16), (1, 32), (2, 32), (1, 64)]
    assert (shapes.windows, shapes.columns) == ((64,), 96)
    runner = SlotRunner(model=model, params=params, mesh=mesh, shapes=shapes)
    runner.warm_up()
    return runner


@pytest.fixture(scope="module")
def naive(tiny: SlotRunner) -> Callable[[Request], list[int]]:
    """Greedy tokens by full forward passes over the whole sequence each time, with no cache to reuse."""
    cfg = tiny.config
    width = cfg.max_position_embeddings
    # A fresh cache exactly as wide as the tokens, written from column 0: each call is a plain full forward pass.
    forward = jax.jit(lambda p, t, first_valid: tiny.net.model.apply(
        {"params": p}, t, KVCache.zeros(cfg, 1, width, jnp.float32), jnp.int32(0), first_valid)[0])
    memo: dict[Request, list[int]] = {}

    def greedy(request: Request) -> list[int]:
        if request not in memo:
            sequence, out = list(request.tokens), []
            for _ in range(request.max_new_tokens):
                padded = np.full((1, width), cfg.pad_token_id, np.int32)  # left-padded: the newest token is last
                padded[0, width - len(sequence) :] = sequence
                logits = forward(tiny.params, padded, np.asarray([width - len(sequence)], np.int32))
                token = int(np.argmax(logits[0, : cfg.vocab_size]))
                if token == cfg.eos_token_id:
                    break
                out.append(token)
                sequence.append(token)
            memo[request] = out
        return memo[request]

    return greedy


class Recorder:
    """A scheduler's `publish`: keeps every plan."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []

    def __call__(self, plan: Plan) -> None:
        self.plans.append(plan)

    def admitted_per_plan(self) -> list[int]:
        return [sum(len(g.admissions) for g in p.groups) for p in self.plans if p.groups]


@pytest.fixture
def runner(tiny: SlotRunner) -> SlotRunner:
    """The tiny runner with every slot empty (a test that failed midway leaves it anywhere)."""
    tiny.reset()
    return tiny


def scheduler(runner: SlotRunner, **options: Any) -> tuple[Scheduler, Recorder]:
    recorder = Recorder()
    return Scheduler(runner, eos_id=runner.config.eos_token_id, publish=recorder, **options), recorder


def prompt(start: int, length: int) -> tuple[int, ...]:
    return tuple(range(start, start + length))


# Prompt lengths from 1 to 49: one chunk, two (one or 15 tokens in the second), exactly one, four; buckets
# 16, 32 and 64; nine requests for four slots.
MIXED = [Request(prompt(100 + 70 * i, n), m) for i, (n, m) in enumerate(
    [(3, 7), (17, 12), (30, 2), (16, 1), (49, 15), (5, 40), (2, 20), (33, 9), (1, 30)])]


# ---------------------------------------------------------------------------------------------------
# Greedy text equals naive full forward passes
# ---------------------------------------------------------------------------------------------------


def test_scheduler_output_equals_naive_greedy_full_forward_passes(runner: SlotRunner, naive) -> None:
    engine, recorder = scheduler(runner)
    expected = [naive(r) for r in MIXED]
    assert len({t for row in expected for t in row}) > 20  # the model says varied things, not one token over
    assert [len(row) for row in expected] == [r.max_new_tokens for r in MIXED]  # random/tiny never says EOS here
    assert engine.generate(MIXED) == expected
    # Requests joined while others ran: more admitting steps than the three batches one at a time needs.
    assert len(recorder.admitted_per_plan()) > 3 and sum(recorder.admitted_per_plan()) == len(MIXED)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_submitted_between_steps_in_any_order_each_equal_the_request_alone(
    runner: SlotRunner, naive, seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(MIXED))
    engine, _ = scheduler(runner)
    submitted: list[tuple[int, InFlight]] = []
    joined_running = 0  # submissions made while an earlier request was part-way through
    i = 0
    while i < len(order):
        count = int(rng.integers(1, 4))  # submit one to three requests, then run up to seven steps
        for index in order[i : i + count]:
            joined_running += any(s.tokens and not s.finished for _, s in submitted)
            submitted.append((int(index), engine.submit(MIXED[index])))
        i += count
        for _ in range(int(rng.integers(0, 8))):
            engine.step()
    while engine.step():
        pass
    assert sorted(index for index, _ in submitted) == list(range(len(MIXED)))
    assert joined_running > 0
    for index, sequence in submitted:
        assert sequence.future.result(timeout=0) == naive(MIXED[index]), index


def test_a_decode_step_runs_the_fewest_compiled_rows_that_cover_the_live_slots(runner: SlotRunner, naive) -> None:
    assert runner.shapes.decode_rows == (1, 2, 4)
    engine, recorder = scheduler(runner)
    assert engine.generate([MIXED[0]]) == [naive(MIXED[0])]
    assert {p.rows for p in recorder.plans} == {1}  # a lone request in slot 0 costs one row, not four
    # Three requests: slots 0, 1 and 2 (4 rows); the two short ones end first, so the longest, in slot 0,
    # finishes alone on one row.
    trio = [Request(prompt(900, 4), 30), Request(prompt(950, 3), 5), Request(prompt(990, 2), 6)]
    recorder.plans.clear()
    assert engine.generate(trio) == [naive(r) for r in trio]
    rows = [p.rows for p in recorder.plans]
    assert rows[0] == 4 and rows[-1] == 1 and 2 not in rows, rows
    # A short request in slot 1 beside the long one in slot 0: two rows, then one.
    recorder.plans.clear()
    long_one, sequences = engine.submit(trio[0]), []
    engine.step()
    sequences.append(engine.submit(trio[1]))
    while engine.step():
        pass
    rows = [p.rows for p in recorder.plans]
    assert rows[0] == 1 and 2 in rows and rows[-1] == 1, rows
    assert [long_one.future.result(timeout=0), sequences[0].future.result(timeout=0)] == [naive(trio[0]), naive(trio[1])]


def test_one_batch_at_a_time_gives_the_same_text_and_admits_only_into_an_empty_engine(runner, naive) -> None:
    engine, recorder = scheduler(runner, one_batch_at_a_time=True)
    assert engine.generate(MIXED) == [naive(r) for r in MIXED]
    assert recorder.admitted_per_plan() == [4, 4, 1]  # nine requests, four slots


def test_the_cache_shifts_left_under_running_rows_and_right_for_a_long_prompt_and_the_text_is_unchanged(
    runner: SlotRunner, naive,
) -> None:
    # Eight requests of 40 to 60 positions keep the four slots busy past column 96, the last, so the cache
    # rolls left by the columns no running row reads (t drops to the oldest row's length). A 40-token
    # prompt (bucket 64) submitted right after is admitted while t is still below 64 and rolls it right.
    first = [Request(prompt(1000 + 90 * i, n), m) for i, (n, m) in enumerate(
        [(3, 50), (5, 45), (2, 55), (8, 40), (4, 50), (6, 44), (20, 30), (3, 40)])]
    long_prompt = Request(prompt(5000, 40), 20)
    engine, recorder = scheduler(runner)
    sequences = [engine.submit(r) for r in first]
    running_at_left_shift: list[int] = []
    while not running_at_left_shift:
        assert engine.step(), "the requests ended before the cache shifted left"
        if recorder.plans[-1].shift > 0:
            running_at_left_shift.append(sum(bool(s.tokens) and not s.finished for s in sequences))
    sequences.append(engine.submit(long_prompt))
    left = len(recorder.plans) - 1
    while engine.step():
        pass
    shifts = [p.shift for p in recorder.plans]
    assert shifts[0] < 0  # the first prompt needs columns before t = 0
    assert not recorder.plans[0].moves  # ... over an empty cache: only t moves, no column is copied
    assert running_at_left_shift[0] > 0  # rows were mid-generation when their columns moved
    assert all(p.moves for p in recorder.plans if p.shift > 0)  # ... so those columns did move
    assert any(s < 0 for s in shifts[left + 1 :]), shifts
    assert [s.future.result(timeout=0) for s in sequences] == [naive(r) for r in [*first, long_prompt]]


def test_requests_up_to_the_last_position_equal_naive_full_forward_passes(runner: SlotRunner, naive) -> None:
    # 49 + 15, 1 + 63 and 48 + 16 = 64 positions: each one's last token comes from position 62, and the
    # frozen step after it (its slot is read a step late) runs at 63, the model's last.
    requests = [Request(prompt(500, 49), 15), Request((7,), 63), Request(prompt(600, 48), 16)]
    expected = [naive(r) for r in requests]
    assert [len(row) for row in expected] == [r.max_new_tokens for r in requests]  # no EOS: every position is reached
    engine, _ = scheduler(runner)
    assert engine.generate(requests) == expected


def test_one_token_after_a_63_token_prompt_beside_other_requests_equals_naive(runner: SlotRunner, naive) -> None:
    # 63 + 1 = 64 positions, which submit accepts; the slot is still counted live (read a step late) in the
    # step after its admission, when it spans 65 columns.
    requests = [Request(prompt(200, 63), 1), Request((5,), 40), Request(prompt(300, 63), 1)]
    engine, _ = scheduler(runner)
    assert engine.generate(requests) == [naive(r) for r in requests]


# ---------------------------------------------------------------------------------------------------
# Compiled once: nothing compiles after warm-up, and an unknown shape is an error
# ---------------------------------------------------------------------------------------------------


def test_nothing_compiles_while_generating_after_warm_up(runner: SlotRunner, naive) -> None:
    before = len(COMPILED)
    jax.jit(lambda x: x * 3 + 1)(np.arange(5))  # the listener hears a compile
    assert COMPILED[before:] == ["jit(<lambda>)"]
    sampled = [Request(prompt(3000 + 50 * i, n), m, Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=i))
               for i, (n, m) in enumerate([(4, 30), (18, 25), (40, 10)])]
    engine, recorder = scheduler(runner)
    before = len(COMPILED)
    out = engine.generate([*MIXED, *sampled, *MIXED])  # every bucket, both decode programs, a left shift
    assert COMPILED[before:] == []
    assert any(p.shift > 0 for p in recorder.plans) and any(p.sampling for p in recorder.plans)
    assert out[: len(MIXED)] == [naive(r) for r in MIXED]


def test_a_plan_of_a_shape_that_was_not_warmed_up_is_an_error_not_a_compile(runner: SlotRunner) -> None:
    programs = dict(runner._programs)
    admission = Admission(0, Request((5, 6, 7), 4))
    unknown = [
        Plan(column=0, shift=-16, groups=(PrefillGroup(3, 16, (admission,)),), window=64, rows=1, sampling=False),  # 3 rows
        Plan(column=0, shift=-48, groups=(PrefillGroup(1, 48, (admission,)),), window=64, rows=1, sampling=False),  # bucket 48
        Plan(column=0, shift=0, groups=(), window=32, rows=1, sampling=False),  # window 32
    ]
    before = len(COMPILED)
    for plan in unknown:
        runner.reset()
        with pytest.raises(RuntimeError, match="not warmed up"):
            runner.run(plan)
    with pytest.raises(RuntimeError, match="plan for column 5 but this rank is at column 0"):
        runner.run(Plan(column=5, shift=0, groups=(), window=64, rows=1, sampling=False))
    assert COMPILED[before:] == []
    assert runner._programs == programs


# ---------------------------------------------------------------------------------------------------
# Sampling through the scheduler
# ---------------------------------------------------------------------------------------------------

SAMPLED = Request(prompt(10, 10), 20, Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=123))


def test_the_same_seed_gives_the_same_tokens_alone_and_in_a_mix_of_greedy_and_sampled_requests(
    runner: SlotRunner, naive,
) -> None:
    engine, alone_plans = scheduler(runner)
    alone = engine.generate([SAMPLED])[0]
    assert len(alone) == SAMPLED.max_new_tokens and alone != naive(dataclasses.replace(SAMPLED, sampling=Sampling()))
    other = Request(prompt(40, 25), 15, Sampling(temperature=1.2, seed=7))
    runner.reset()
    engine, recorder = scheduler(runner)
    mixed = engine.generate([*MIXED[:3], other, MIXED[5], SAMPLED, MIXED[6]])
    assert mixed[5] == alone
    assert [mixed[i] for i in (0, 1, 2, 4, 6)] == [naive(r) for r in [*MIXED[:3], MIXED[5], MIXED[6]]]
    assert mixed[3] != naive(dataclasses.replace(other, sampling=Sampling()))
    # Greedy-only steps run the program without sampling: in the mix, once the sampled rows are done.
    assert all(p.sampling for p in alone_plans.plans) and not all(p.sampling for p in recorder.plans)


def test_different_seeds_give_different_tokens(runner: SlotRunner) -> None:
    engine, _ = scheduler(runner)
    rows = engine.generate([dataclasses.replace(SAMPLED, sampling=dataclasses.replace(SAMPLED.sampling, seed=s))
                            for s in (123, 124, 2**40 + 123)])
    assert rows[0] != rows[1] and rows[0] != rows[2] and rows[1] != rows[2]


def test_top_k_one_and_temperature_zero_give_the_greedy_tokens(runner: SlotRunner, naive) -> None:
    engine, _ = scheduler(runner)
    greedy = Request(prompt(77, 9), 25)
    rows = engine.generate([dataclasses.replace(greedy, sampling=s) for s in (
        Sampling(temperature=5.0, top_k=1, seed=1), Sampling(temperature=0.0, top_k=3, top_p=0.5, seed=2),
        Sampling(temperature=1.0, seed=3))])  # the third samples, so the first two run in the sampling program
    assert rows[0] == rows[1] == naive(greedy)
    assert rows[2] != naive(greedy)


# ---------------------------------------------------------------------------------------------------
# Deadlines, cancellation, the bounded queue and the drain
# ---------------------------------------------------------------------------------------------------


def run_until_done(engine: Scheduler, sequences: list[InFlight], most_steps: int = 500) -> None:
    for _ in range(most_steps):
        if all(s.future.done() for s in sequences) and not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def test_a_request_past_its_deadline_times_out_and_frees_its_slot_for_the_next(runner: SlotRunner, naive) -> None:
    from engine import DeadlineExceeded

    engine, _ = scheduler(runner)
    # Four long rows fill the four slots; the first of them has a deadline that passes after a few steps.
    long = [Request(prompt(300 + 40 * i, 4), 40) for i in range(4)]
    doomed = engine.submit(long[0], timeout=0.0)  # already past: it must end before its first step
    others = [engine.submit(r) for r in long[1:]]
    waiting = engine.submit(MIXED[0])  # no slot is free for it until the doomed row's slot is
    run_until_done(engine, [doomed, *others, waiting])
    with pytest.raises(DeadlineExceeded, match=r"timed out: the request's deadline of 0 s passed after 0 of 40"):
        doomed.future.result()
    assert [s.future.result() for s in others] == [naive(r) for r in long[1:]]
    assert waiting.future.result() == naive(MIXED[0])
    assert waiting.first_token_at < min(s.first_token_at for s in others) + 10  # it did not wait for them to end


def test_a_deadline_that_passes_mid_generation_keeps_the_tokens_made_so_far_out_of_the_answer(
    runner: SlotRunner, naive
) -> None:
    from engine import DeadlineExceeded

    engine, _ = scheduler(runner)
    sequence = engine.submit(Request(prompt(7, 3), 50), timeout=3600)
    for _ in range(6):
        engine.step()
    sequence.deadline = sequence.submitted  # as if an hour went by
    neighbour = engine.submit(MIXED[1])
    run_until_done(engine, [sequence, neighbour])
    with pytest.raises(DeadlineExceeded, match=r"after [1-9]\d* of 50 tokens"):
        sequence.future.result()
    assert neighbour.future.result() == naive(MIXED[1])
    assert not any(engine._slots)


def test_a_cancelled_request_fails_at_once_and_its_slot_serves_the_next_request(runner: SlotRunner, naive) -> None:
    from engine import Cancelled

    engine, _ = scheduler(runner)
    running = [engine.submit(Request(prompt(500 + 30 * i, 5), 45)) for i in range(4)]
    queued = engine.submit(MIXED[2])
    for _ in range(3):
        engine.step()
    engine.cancel(running[0], Cancelled("the client disconnected"))
    engine.cancel(queued, Cancelled("the client disconnected"))  # still waiting: leaves the queue
    late = engine.submit(MIXED[3])
    engine.step()
    assert late.tokens == [] and any(s is late for s in engine._slots)  # admitted into the freed slot
    run_until_done(engine, [*running, queued, late])
    for sequence in (running[0], queued):
        with pytest.raises(Cancelled, match="the client disconnected"):
            sequence.future.result()
    assert [s.future.result() for s in running[1:]] == [naive(s.request) for s in running[1:]]
    assert late.future.result() == naive(MIXED[3])


def test_a_row_ended_early_keeps_its_tokens_counts_as_stopped_and_frees_its_slot(runner: SlotRunner, naive) -> None:
    ends: list[engine_module.Ended] = []

    class Ends(engine_module._NoMetrics):
        def finished(self, ended: engine_module.Ended) -> None:
            ends.append(ended)

    engine, _ = scheduler(runner, metrics=Ends())
    stopped = engine.submit(Request(prompt(700, 5), 45))  # its front end met a stop string after a few tokens
    for _ in range(4):
        engine.step()
    engine.end_early(stopped)
    engine.step()
    assert stopped.future.done() and not any(s is stopped for s in engine._slots)
    kept = stopped.future.result()
    assert 0 < len(kept) < 45 and kept == naive(stopped.request)[:len(kept)]
    assert [(e.outcome, e.reason, e.tokens, e.api) for e in ends] == [("ok", "stop", len(kept), "triton")]


def test_a_full_queue_refuses_a_request_at_once_and_takes_it_again_once_there_is_room(runner: SlotRunner) -> None:
    from engine import Overloaded

    refusals: list[tuple[int, str]] = []

    class Refusals(engine_module._NoMetrics):
        def refused(self, api: str, rows: int, reason: str) -> None:
            refusals.append((rows, reason))

    engine, _ = scheduler(runner, max_waiting=3, metrics=Refusals())
    # Four rows for the four free slots and three for the queue: all taken before any step.
    first = engine.submit_all([Request(prompt(10 * i, 2), 30) for i in range(7)])
    with pytest.raises(Overloaded, match=r"overloaded: 3 rows already wait .* queue holds 3 \(--max-queue-size\)"):
        engine.submit(Request(prompt(1, 2), 2))
    engine.step()  # four go into slots; three still wait
    with pytest.raises(Overloaded):  # all rows of a request or none
        engine.submit_all([Request(prompt(1, 2), 2)] * 2)
    assert engine.in_flight == 7 and refusals == [(1, "overloaded"), (2, "overloaded")]
    run_until_done(engine, first)
    again = engine.submit_all([Request(prompt(1, 2), 2)] * 7)
    run_until_done(engine, again)
    assert all(len(s.future.result()) == n for s, n in [*((s, 30) for s in first), *((s, 2) for s in again)])


def test_a_drain_refuses_new_requests_finishes_those_in_flight_and_cancel_all_ends_the_rest(runner: SlotRunner,
                                                                                             naive) -> None:
    from engine import Draining, ShuttingDown

    engine, _ = scheduler(runner)
    finishing = engine.submit(MIXED[0])
    engine.stop_accepting(Draining("shutting down"))
    with pytest.raises(Draining, match="shutting down"):
        engine.submit(MIXED[1])
    run_until_done(engine, [finishing])
    assert finishing.future.result() == naive(MIXED[0])

    runner.reset()
    engine, _ = scheduler(runner)
    long = engine.submit(Request(prompt(9, 4), 60))
    engine.step()
    engine.cancel_all(ShuttingDown("grace period over"))
    run_until_done(engine, [long])
    with pytest.raises(ShuttingDown, match="grace period over"):
        long.future.result()
    assert engine.in_flight == 0


def test_a_listener_that_raises_cancels_only_its_own_request(runner: SlotRunner, naive) -> None:
    from engine import Cancelled

    engine, _ = scheduler(runner)

    def closed_loop(token: int) -> None:
        raise RuntimeError("Event loop is closed")

    broken = engine.submit(Request(prompt(40, 3), 30), on_token=closed_loop)
    fine = engine.submit(MIXED[4])
    run_until_done(engine, [broken, fine])
    with pytest.raises(Cancelled, match="listener failed: Event loop is closed"):
        broken.future.result()
    assert fine.future.result() == naive(MIXED[4])
    assert engine.failure is None
