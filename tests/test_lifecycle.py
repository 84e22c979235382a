"""What a careful read of the server found (issue 14), each pinned by a test that failed before its fix:
races between the engine's thread and an abort, rows left in their slots by a closed stream or a
cancelled call, the time per output token of rows ending on EOS, a truncated channel message, stub
folders under $TMPDIR, the lost-rank-0 hook inside a signal handler, and the stub model's error table."""
from __future__ import annotations

import ast
import asyncio
import importlib
import socket
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Mapping

import numpy as np
import psutil
import pytest

import cancellation
import channel
import engine
import opt_utils
import reaper
import triton_models
from plan import Admission, Plan, PrefillGroup, Request, Sampling, SlotShapes

ROOT = Path(__file__).resolve().parent.parent


class Recorded:
    """engine.Metrics that keeps what it is told; `on_tokens` runs inside `token` (a race's window)."""

    def __init__(self) -> None:
        self.finished_calls: list[tuple[int, float | None, str]] = []
        self.on_tokens = lambda: None

    def first_token(self, api: str, seconds: float) -> None:
        pass

    def finished(self, ended: engine.Ended) -> None:
        self.finished_calls.append((ended.tokens, ended.seconds_per_token, ended.outcome))

    def token(self, api: str, gap: float | None) -> None:
        self.on_tokens()

    def admitted(self, api: str, prompt_tokens: int) -> None:
        pass

    def load(self, waiting: Mapping[str, int], running: Mapping[str, int]) -> None:
        pass

    def refused(self, api: str, rows: int, reason: str) -> None:
        pass


def test_no_token_follows_the_end_when_an_abort_races_the_engine_thread() -> None:
    events: list[object] = []
    sequence = engine.InFlight(Request((1,), 5), events.append, eos_id=99)
    sequence.future.add_done_callback(lambda _: events.append("end"))
    metrics = Recorded()
    racer = threading.Thread(target=sequence.fail, args=(engine.Cancelled("aborted"), metrics))

    def abort_in_the_window() -> None:  # between the token's check and its delivery
        racer.start()
        racer.join(0.5)

    metrics.on_tokens = abort_in_the_window
    sequence.add(7, 0.0, metrics)
    racer.join(5)
    assert events == [7, "end"]  # before the fix: ["end", 7], and a stream waited for an end it had seen
    assert isinstance(sequence.future.exception(), engine.Cancelled)


def test_a_late_finish_after_an_abort_raises_nothing_in_the_engine_thread() -> None:
    sequence = engine.InFlight(Request((1,), 1), None, eos_id=99)
    metrics = Recorded()
    sequence.fail(engine.Cancelled("aborted"), metrics)
    sequence.finish(1.0, metrics)  # the engine's last step for it, read a step late
    assert isinstance(sequence.future.exception(), engine.Cancelled)


@pytest.mark.parametrize(("tokens", "eos", "per_token"), [
    ([5, 6, 7], False, 1.0),  # three tokens at 0, 1, 2: two gaps of one second
    ([5, 6, 7], True, 1.0),  # and EOS at 3: three gaps (before the fix: 3 s over 2 = 1.5)
    ([5], True, 1.0),  # one token, then EOS: one gap
    ([], True, None),  # EOS first: no gap
])
def test_time_per_output_token_counts_the_gap_before_eos(tokens: list[int], eos: bool, per_token: float | None) -> None:
    metrics = Recorded()
    sequence = engine.InFlight(Request((1,), 10), None, eos_id=99)
    for now, token in enumerate(tokens + ([99] if eos else [])):
        sequence.add(token, float(now), metrics)
    if not eos:
        sequence.finish(float(len(tokens) - 1), metrics)
    assert metrics.finished_calls == [(len(tokens), per_token, "ok")]


def test_a_truncated_channel_message_is_a_group_error() -> None:
    plan = Plan(column=3, shift=0, window=128, rows=1, sampling=False,
                groups=(PrefillGroup(1, 64, (Admission(0, Request((5, 6), 2, Sampling(seed=3))),)),))
    message = channel.encode_plan(plan)
    for cut in (1, 2, 3, 4):
        with pytest.raises(channel.GroupError):  # before the fix: numpy's ValueError, out of the worker's loop
            channel.decode_plan(message[:-cut])


def test_stub_folders_are_found_in_the_temporary_folder_tmpdir_names(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what TMPDIR=tmp_path gives
    stub = tmp_path / "folderA1b2" / "1" / "model.py"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", str(stub)],
                               stdout=subprocess.PIPE, text=True)
    try:  # a stub's command line is read long after its start; right after Popen, /proc can still show none
        assert sleeper.stdout is not None and sleeper.stdout.readline() == "up\n"
        assert reaper.stub_model_folders([psutil.Process(sleeper.pid)]) == {tmp_path / "folderA1b2"}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_lost_rank_0_hook_only_writes_and_exits_inside_the_signal_handler() -> None:
    """A head that still answers: the old hook connected to it three times (and slept) inside the handler."""
    head = socket.create_server(("127.0.0.1", 0))
    head.setblocking(False)
    code = (f"import sys, os; sys.path.insert(0, {str(ROOT)!r}); import group; "
            f"hook = group.report_abort_as_lost_rank_0(1, '127.0.0.1:{head.getsockname()[1]}'); os.abort()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "rank 1 ERROR server: lost rank 0: its coordination service at 127.0.0.1:" in result.stderr
    with pytest.raises(BlockingIOError):
        head.accept()  # nobody connected
    head.close()


def test_the_stub_models_error_table_names_exception_classes_that_exist() -> None:
    tree = ast.parse((ROOT / "stub_model.py").read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "ERROR_CODES" for t in node.targets))
    assert table
    for qualified, code in table.items():
        module, name = qualified.rsplit(".", 1)
        error = getattr(importlib.import_module(module), name)
        assert isinstance(error, type) and issubclass(error, BaseException), qualified
        assert code in {"INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL"}, code


# -- a closed stream or a cancelled call frees its rows ---------------------------------------------


@pytest.fixture
def queue_only() -> engine.Scheduler:
    """A scheduler whose rows stay queued: nothing is stepped, so a row ends only when it is cancelled."""
    shapes = SlotShapes.make(slots=2, max_positions=64, chunk=16)
    return engine.Scheduler(types.SimpleNamespace(shapes=shapes), eos_id=2)


def triton_request(prompt: bytes) -> object:
    from pytriton.proxy.types import Request as TritonRequest

    return TritonRequest(data={"input": np.array([[prompt]], dtype=object),
                               "output_length": np.array([[4]], dtype=np.int64)})


async def start_then_cancel(awaitable: object) -> None:
    task = asyncio.ensure_future(awaitable)
    await asyncio.sleep(0.2)  # the rows are queued by now, their callable waits for tokens
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("model", ["OPT", "OPT_stream"])
def test_a_cancelled_call_or_a_closed_stream_frees_its_rows(queue_only: engine.Scheduler, model: str) -> None:
    tokenizer = opt_utils.ByteLevelBPETokenizer.from_gpt2_files(2)
    parser = triton_models.RequestParser(tokenizer, 64, 50272)
    cancels = cancellation.CancelListener()
    try:
        if model == "OPT":
            call = triton_models.make_infer_fn(queue_only, parser, cancels)([triton_request(b"Hello there")])
        else:
            call = triton_models.make_stream_fn(queue_only, parser, cancels)([triton_request(b"Hello there")]).__anext__()
        asyncio.run(start_then_cancel(call))
    finally:
        cancels.close()
    assert queue_only.in_flight == 1  # the cancel waits for the next step, as any other
    queue_only.step()
    assert queue_only.in_flight == 0  # before the fix: 1, for as long as the server ran


def test_closing_a_stream_generator_frees_its_row(queue_only: engine.Scheduler) -> None:
    tokenizer = opt_utils.ByteLevelBPETokenizer.from_gpt2_files(2)
    parser = triton_models.RequestParser(tokenizer, 64, 50272)
    cancels = cancellation.CancelListener()

    async def first_piece_then_close() -> None:
        stream = triton_models.make_stream_fn(queue_only, parser, cancels)([triton_request(b"Hello")])
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)
        (sequence,) = [*queue_only._waiting]
        sequence.add(11, 0.0, engine.NO_METRICS)  # a token, as the engine's thread would hand it over
        await pending
        await stream.aclose()  # the client's side went away after its first piece

    try:
        asyncio.run(first_piece_then_close())
    finally:
        cancels.close()
    queue_only.step()
    assert queue_only.in_flight == 0
