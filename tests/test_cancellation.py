"""Cancellation reaches the callable: the listener alone, then a real Triton through PyTriton and real clients.

The Triton tests bind tiny models of their own (not server.py's): `ticker`, decoupled, streams a count
every 50 ms; `slow`, not decoupled, answers after 10 s. Each callable watches its request's key and stops
when the listener calls back, recording what it saw. `failing` (not decoupled) and `failing_stream`
(decoupled) raise the exception their `kind` input names: our stub answers each with that exception's
text alone and a status after its class, over every transport.
"""
from __future__ import annotations

import asyncio
import dataclasses
import http.client
import importlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import cancellation
import engine
from cancellation import CANCEL_KEY_PARAMETER, CancelListener, cancel_key
from tests.serving import free_ports

TICK_S = 0.05
NOTICE_S = 3.0  # the stub polls every 0.25 s: a cancel must reach the callable well within this


def send(path: str, key: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(key.encode(), path)


def flushed(listener: CancelListener) -> None:
    """Returns once the listener handled every datagram sent before: they are handled in order."""
    done = threading.Event()
    listener.watch("flush-marker", done.set)
    send(listener.path, "flush-marker")
    assert done.wait(5)


@pytest.fixture
def listener() -> Iterator[CancelListener]:
    with CancelListener() as running:
        yield running


def test_a_reported_key_calls_its_own_callback_once(listener: CancelListener):
    calls: list[str] = []
    listener.watch("a", lambda: calls.append("a"))
    listener.watch("b", lambda: calls.append("b"))
    send(listener.path, "a")
    send(listener.path, "a")
    flushed(listener)
    assert calls == ["a"]


def test_unknown_keys_and_failing_callbacks_leave_the_listener_working(listener: CancelListener):
    calls: list[str] = []
    listener.watch("boom", lambda: 1 / 0)
    listener.watch("a", lambda: calls.append("a"))
    send(listener.path, "nobody-watches-this")
    send(listener.path, "boom")
    send(listener.path, "a")
    flushed(listener)
    assert calls == ["a"]


def test_a_cancel_that_comes_before_watch_calls_back_at_once(listener: CancelListener):
    send(listener.path, "early")
    flushed(listener)
    calls: list[str] = []
    listener.watch("early", lambda: calls.append("early"))
    assert calls == ["early"]


def test_unwatch_stops_the_callback_and_a_none_key_watches_nothing(listener: CancelListener):
    calls: list[str] = []
    unwatch = listener.watch("a", lambda: calls.append("a"))
    unwatch()
    unwatch()
    listener.watch(None, lambda: calls.append("none"))()
    send(listener.path, "a")
    flushed(listener)
    assert calls == []


def test_close_removes_the_socket_its_directory_and_the_environment_variable():
    listener = CancelListener()
    path = Path(listener.path)
    assert path.is_socket() and os.environ[cancellation.CANCEL_SOCKET_ENV] == listener.path
    assert path.parent.stat().st_mode & 0o777 == 0o700
    listener.close()
    listener.close()
    assert not path.parent.exists() and cancellation.CANCEL_SOCKET_ENV not in os.environ


def test_cancel_key_reads_the_stubs_parameter_and_nothing_else():
    from pytriton.proxy.types import Request

    assert cancel_key(Request(data={}, parameters={CANCEL_KEY_PARAMETER: "12-3"})) == "12-3"
    assert cancel_key(Request(data={}, parameters={CANCEL_KEY_PARAMETER: 5})) is None
    assert cancel_key(Request(data={}, parameters=None)) is None


def test_a_local_model_store_gets_pytritons_model_renamed_and_ours_as_model_py(tmp_path: Path):
    import pytriton.proxy
    from pytriton.decorators import TritonContext
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.models.model import Model
    from pytriton.utils.workspace import Workspace

    cancellation.install_stub_model()
    cancellation.install_stub_model()
    model = Model("m", 2, lambda requests: requests, [Tensor(name="x", dtype=np.int64, shape=(1,))],
                  [Tensor(name="y", dtype=np.int64, shape=(1,))], ModelConfig(), Workspace(tmp_path / "workspace"),
                  TritonContext(), strict=False)
    model.generate_model(tmp_path / "repository")
    folder = tmp_path / "repository" / "m" / "2"
    original = (Path(pytriton.proxy.__file__).parent / "model.py").read_bytes()
    assert (folder / "pytriton_model.py").read_bytes() == original
    assert (folder / "model.py").read_bytes() == cancellation.STUB_MODEL_FILE.read_bytes()
    files = model.get_proxy_model_files()
    assert files["file:2/pytriton_model.py"] == original
    assert files["file:2/model.py"] == cancellation.STUB_MODEL_FILE.read_bytes()


@dataclasses.dataclass
class Seen:
    """What one callable saw of its request."""
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    ticks: int = 0
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Served:
    triton: Any
    listener: CancelListener
    seen: dict[str, Seen]
    http_port: int
    grpc_port: int


def _outputs(key: str, count: int) -> dict[str, np.ndarray]:
    return {"key": np.array([[key.encode()]]), "count": np.array([[count]], np.int64)}


def make_ticker(listener: CancelListener, seen: dict[str, Seen]):
    async def ticker(requests: list[Any]):
        key = cancel_key(requests[0])
        seen[key] = record = Seen()
        unwatch = listener.watch(key, record.cancelled.set)
        try:
            for count in range(int(requests[0]["n"].item())):
                if record.cancelled.is_set():
                    return
                record.ticks = count + 1
                yield [_outputs(key, count)]
                await asyncio.sleep(TICK_S)
        finally:
            unwatch()
            record.finished.set()

    return ticker


def make_slow(listener: CancelListener, seen: dict[str, Seen]):
    async def slow(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        key = cancel_key(requests[0])
        seen[key] = record = Seen()
        unwatch = listener.watch(key, record.cancelled.set)
        try:
            for record.ticks in range(1, 201):
                if record.cancelled.is_set():
                    break
                await asyncio.sleep(TICK_S)
        finally:
            unwatch()
            record.finished.set()
        return [_outputs(key, record.ticks)]

    return slow


@dataclasses.dataclass(frozen=True)
class Failure:
    """What a callable raises, and what each transport's client sees of it."""

    kind: str
    raise_it: Callable[[], None]
    http: int  # the HTTP status of infer
    grpc: str  # tritonclient.grpc's status() of a unary infer
    message: str  # the whole error message, on every transport


def _raise(error: Callable[[], BaseException], cause: type[BaseException] | None = None) -> Callable[[], None]:
    """Raises a new `error()` each call (an instance raised twice would pile up tracebacks), from `cause`."""
    def raise_it() -> None:
        if cause is None:
            raise error()
        try:
            raise cause("while handling this")
        except cause as caught:
            raise error() from caught

    return raise_it


def _bad_parameter(message: str) -> BaseException:
    from pytriton.exceptions import PyTritonBadParameterError

    return PyTritonBadParameterError(message)


OVERLOADED = "overloaded: 4 rows already wait for a decode slot and the queue holds 4 (--max-queue-size); retry later"
DRAINING = "the server is shutting down (draining after SIGTERM) and takes no new requests"
FAILURES = [
    Failure("bad-parameter", _raise(lambda: _bad_parameter("row 0: input is empty")), 400,
            "StatusCode.INVALID_ARGUMENT", "row 0: input is empty"),
    Failure("overloaded", _raise(lambda: engine.Overloaded(OVERLOADED)), 503, "StatusCode.UNAVAILABLE", OVERLOADED),
    Failure("draining", _raise(lambda: engine.Draining(DRAINING)), 503, "StatusCode.UNAVAILABLE", DRAINING),
    Failure("shutting-down", _raise(lambda: engine.ShuttingDown("shutting down: the drain's 30 s passed")), 503,
            "StatusCode.UNAVAILABLE", "shutting down: the drain's 30 s passed"),
    Failure("cancelled", _raise(lambda: engine.Cancelled("cancelled: the client closed the request")), 400,
            "StatusCode.CANCELLED", "cancelled: the client closed the request"),
    Failure("deadline", _raise(lambda: engine.DeadlineExceeded("timed out: the request's deadline of 1 s passed")),
            500, "StatusCode.INTERNAL", "timed out: the request's deadline of 1 s passed"),
    Failure("other", _raise(lambda: ZeroDivisionError("division by zero")), 500, "StatusCode.INTERNAL",
            "division by zero"),
    # the final exception decides, not the one it was raised from
    Failure("chained", _raise(lambda: engine.Overloaded(OVERLOADED), KeyError), 503, "StatusCode.UNAVAILABLE",
            OVERLOADED),
    Failure("no-text", _raise(engine.Draining), 503, "StatusCode.UNAVAILABLE", "engine.Draining"),
    Failure("two-lines", _raise(lambda: ValueError("first line\nsecond line: more")), 500, "StatusCode.INTERNAL",
            "first line\nsecond line: more"),
]
GENERATE_STREAM_STATUS = 400  # Triton's generate_stream gives every error in its first response 400, whatever the code
FAILURE = {failure.kind: failure for failure in FAILURES}
AFTER_ONE = "after-one:"  # a `kind` so prefixed fails the stream after one response


def make_failing():
    async def failing(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        FAILURE[requests[0]["kind"].item().decode()].raise_it()
        return [_outputs("never", 0)]

    return failing


def make_failing_stream():
    async def failing_stream(requests: list[Any]):
        kind = requests[0]["kind"].item().decode()
        if kind.startswith(AFTER_ONE):
            kind = kind[len(AFTER_ONE):]
            yield [_outputs("first", 0)]
        FAILURE[kind].raise_it()

    return failing_stream


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    import triton_models

    triton_models.ensure_libpython_on_path()
    cancellation.install_stub_model()
    listener = CancelListener()  # before Triton starts: its stubs inherit the socket's path
    seen: dict[str, Seen] = {}
    http_port, grpc_port, metrics_port = free_ports(3)
    triton = Triton(config=TritonConfig(exit_timeout_secs=2, http_address="127.0.0.1", http_port=http_port,
                                        grpc_address="127.0.0.1", grpc_port=grpc_port,
                                        metrics_address="127.0.0.1", metrics_port=metrics_port))
    try:
        inputs = [Tensor(name="n", dtype=np.int64, shape=(1,))]
        outputs = [Tensor(name="key", dtype=bytes, shape=(1,)), Tensor(name="count", dtype=np.int64, shape=(1,))]
        triton.bind(model_name="ticker", infer_func=make_ticker(listener, seen), inputs=inputs, outputs=outputs,
                    config=ModelConfig(decoupled=True, batcher=None, max_batch_size=1), strict=True)
        triton.bind(model_name="slow", infer_func=make_slow(listener, seen), inputs=inputs, outputs=outputs,
                    config=ModelConfig(batcher=None, max_batch_size=1), strict=True)
        kinds = [Tensor(name="kind", dtype=bytes, shape=(1,))]
        triton.bind(model_name="failing", infer_func=make_failing(), inputs=kinds, outputs=outputs,
                    config=ModelConfig(batcher=None, max_batch_size=1), strict=True)
        triton.bind(model_name="failing_stream", infer_func=make_failing_stream(), inputs=kinds, outputs=outputs,
                    config=ModelConfig(decoupled=True, batcher=None, max_batch_size=1), strict=True)
        triton.run()
        yield Served(triton, listener, seen, http_port, grpc_port)
    finally:
        triton_models.stop_triton(triton)  # also ends leftover stubs and removes their /tmp/folder* copies
        listener.close()


def grpc_input(grpc: Any, n: int) -> Any:
    tensor = grpc.InferInput("n", [1, 1], "INT64")
    tensor.set_data_from_numpy(np.array([[n]], np.int64))
    return tensor


class Responses:
    """A gRPC stream's callback that keeps the keys it received and wakes whoever waits for some."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.errors: list[str] = []
        self._arrived = threading.Condition()

    def __call__(self, result: Any, error: Any) -> None:
        with self._arrived:
            if error is not None:
                self.errors.append(str(error))
            else:
                self.keys.append(result.as_numpy("key")[0][0].decode())
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.keys) >= count or self.errors, timeout), self.keys
        assert not self.errors, self.errors


def test_a_grpc_stream_stopped_with_cancel_reaches_the_decoupled_callable(served: Served):
    import tritonclient.grpc as grpc

    responses = Responses()
    client = grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    try:
        client.start_stream(callback=responses)
        # a client's own value for the key is replaced: it cannot cancel (or hide) someone else's request
        client.async_stream_infer("ticker", [grpc_input(grpc, 1200)], parameters={CANCEL_KEY_PARAMETER: "forged"})
        responses.wait_for(3)
        client.stop_stream(cancel_requests=True)
        stopped = time.monotonic()
        key = responses.keys[0]
        assert key != "forged"
        record = served.seen[key]
        assert record.cancelled.wait(NOTICE_S)
        assert record.finished.wait(1)
        assert time.monotonic() - stopped < NOTICE_S and record.ticks < 1200
    finally:
        client.close()


def three_ticks(served: Served) -> Responses:
    """A gRPC stream of three ticks that ends by itself (the client waits for all three)."""
    import tritonclient.grpc as grpc

    responses = Responses()
    client = grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    try:
        client.start_stream(callback=responses)
        client.async_stream_infer("ticker", [grpc_input(grpc, 3)])
        responses.wait_for(3)
        client.stop_stream()
    finally:
        client.close()
    return responses


def test_a_stream_that_ends_by_itself_is_never_reported_cancelled(served: Served):
    responses = three_ticks(served)
    record = served.seen[responses.keys[0]]
    assert record.finished.wait(5) and record.ticks == 3
    time.sleep(4 * 0.25)  # a few of the stub's polls
    late: list[str] = []
    served.listener.watch(responses.keys[0], lambda: late.append("cancelled"))  # a report would be remembered
    assert late == [] and not record.cancelled.is_set()


def test_an_http_generate_stream_closed_by_its_client_reaches_the_decoupled_callable(served: Served):
    connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    connection.request("POST", "/v2/models/ticker/generate_stream", body=json.dumps({"n": [1200]}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    events = []
    while len(events) < 3:
        line = response.fp.readline()
        assert line, events
        if line.startswith(b"data:"):
            events.append(json.loads(line[len(b"data:"):]))
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    record = served.seen[events[0]["key"]]
    assert record.cancelled.wait(NOTICE_S)
    assert record.finished.wait(1) and record.ticks < 1200


def test_a_grpc_infer_past_its_deadline_reaches_the_non_decoupled_callable(served: Served):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    before = set(served.seen)
    try:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("slow", [grpc_input(grpc, 1)], client_timeout=1.0)
    finally:
        client.close()
    deadline = time.monotonic()
    while not (keys := set(served.seen) - before) and time.monotonic() < deadline + NOTICE_S:
        time.sleep(0.05)
    (key,) = keys
    assert served.seen[key].cancelled.wait(NOTICE_S)
    assert served.seen[key].ticks < 200  # it stopped long before its 10 s


# ---------------------------------------------------------------------------------------------------
# A failing callable: each request's error is the exception's own text, its status after its class
# ---------------------------------------------------------------------------------------------------


class FakeTritonError:
    """pb_utils.TritonError of Triton 2.51 as far as stub_model.py uses it (its codes are ints there)."""

    ALREADY_EXISTS, CANCELLED, INTERNAL, INVALID_ARG, NOT_FOUND, UNAVAILABLE, UNKNOWN, UNSUPPORTED = (
        "ALREADY_EXISTS", "CANCELLED", "INTERNAL", "INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "UNKNOWN", "UNSUPPORTED")

    def __init__(self, message: str, code: str = INTERNAL):
        self.message, self.code = message, code


@pytest.fixture
def stub_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """stub_model.py imported as the stub imports it (`<version>.model`, PyTriton's proxy files beside it as
    install_stub_model leaves them), with a stand-in for the module only the stub has."""
    import pytriton.proxy

    pb_utils = types.ModuleType("triton_python_backend_utils")
    pb_utils.TritonError = FakeTritonError
    pb_utils.TritonModelException = type("TritonModelException", (Exception,), {})
    pb_utils.InferenceResponse = lambda error: ("response", error.message, error.code)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    package = tmp_path / "stub_version_1"
    package.mkdir()
    for source in Path(pytriton.proxy.__file__).parent.glob("*.py"):
        shutil.copy(source, package / source.name)
    (package / "model.py").replace(package / cancellation.PYTRITON_MODEL_FILE)
    shutil.copy(cancellation.STUB_MODEL_FILE, package / "model.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("stub_version_1.model")
    finally:
        for name in [n for n in sys.modules if n == "stub_version_1" or n.startswith("stub_version_1.")]:
            del sys.modules[name]


def formatted(raise_it: Callable[[], None]) -> str:
    """What PyTriton sends the stub when the callable raises: traceback.format_exception's text."""
    try:
        raise_it()
    except Exception as error:
        return "".join(traceback.format_exception(None, error, error.__traceback__))
    raise AssertionError("nothing raised")


def test_the_stub_reads_the_final_exception_of_a_traceback_and_picks_its_code(stub_module: Any):
    def error_of(payload: str) -> tuple[str, str]:
        error = stub_module.triton_error(payload)
        return error.message, error.code

    for failure in FAILURES:
        grpc_code = failure.grpc.removeprefix("StatusCode.").replace("INVALID_ARGUMENT", "INVALID_ARG")
        assert error_of(formatted(failure.raise_it)) == (failure.message, grpc_code), failure.kind
    assert stub_module.final_exception(formatted(FAILURE["chained"].raise_it)) == ("engine.Overloaded", OVERLOADED)
    # not a traceback (PyTriton's own "Cancelled responses handler"), or one whose end does not parse: all of it
    assert error_of("Cancelled responses handler") == ("Cancelled responses handler", "INTERNAL")
    group = formatted(_raise(lambda: ExceptionGroup("two", [ValueError("a"), KeyError("b")])))
    assert error_of(group) == (group, "INTERNAL")


def test_a_triton_without_cancelled_answers_a_cancelled_request_internal(stub_module: Any,
                                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(FakeTritonError, "CANCELLED")
    error = stub_module.triton_error(formatted(FAILURE["cancelled"].raise_it))
    assert (error.message, error.code) == ("cancelled: the client closed the request", "INTERNAL")


def test_pytritons_errors_carry_the_final_exceptions_code_and_an_explicit_code_is_kept(stub_module: Any):
    import triton_python_backend_utils as pb_utils

    seen_by_pytriton = stub_module.pytriton_model.pb_utils  # PyTriton's module makes its TritonErrors through us
    assert seen_by_pytriton.TritonError(formatted(FAILURE["draining"].raise_it)).code == "UNAVAILABLE"
    assert seen_by_pytriton.TritonError("x", "NOT_FOUND").code == "NOT_FOUND"
    assert seen_by_pytriton.TritonModelException is pb_utils.TritonModelException


def test_a_model_that_is_not_decoupled_sends_its_answer_with_the_end_as_one_final_response(stub_module: Any):
    flags = stub_module.pytriton_model.PyTritonResponseFlags
    end, error = flags.EOS, flags.ERROR | flags.EOS

    async def read(*items: Any) -> tuple[list[Any], int]:
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        once = stub_module._OneFinalResponse(queue)
        got = []
        while not got or not got[-1][0] & flags.EOS:
            got.append(await once.get())
            once.task_done()
        return got, queue._unfinished_tasks  # every item PyTriton queued is marked done

    assert asyncio.run(read((flags(0), b"answer"), (end, None))) == ([(end, b"answer")], 0)
    assert asyncio.run(read((error, b"refused"))) == ([(error, b"refused")], 0)  # an error alone passes as it is
    assert asyncio.run(read((flags(0), b"answer"), (error, b"late"))) == ([(error, b"late")], 0)
    (item,), _ = asyncio.run(read((flags(0), b"one"), (flags(0), b"two"), (end, None)))
    assert item == (error, b"the callable of a model that is not decoupled gave more than one answer")


def test_the_stub_tells_pytriton_every_model_is_decoupled_and_leaves_the_rest_of_the_config(stub_module: Any):
    config = {"name": "OPT", "max_batch_size": 256, "input": [{"name": "input"}]}
    args = {"model_name": "OPT", "model_config": json.dumps(config)}
    seen = stub_module.responding_through_senders(args)
    assert json.loads(seen["model_config"]) == {**config, "model_transaction_policy": {"decoupled": True}}
    assert seen["model_name"] == "OPT" and json.loads(args["model_config"]) == config  # the original is untouched


def kind_input(lib: Any, kind: str) -> Any:
    tensor = lib.InferInput("kind", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[kind.encode()]], dtype=object))
    return tensor


def post(served: Served, path: str, body: dict) -> tuple[int, bytes]:
    call = urllib.request.Request(f"http://127.0.0.1:{served.http_port}{path}", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def sse_events(raw: bytes) -> list[dict]:
    import client

    return [json.loads(data) for data in client.sse_data(raw.splitlines(keepends=True))]


def grpc_stream(served: Served, kind: str) -> tuple[list[Any], list[Any]]:
    """One request to failing_stream on a gRPC stream: the responses, then the errors, until the first error."""
    import queue

    import tritonclient.grpc as grpc

    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    connection = grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    connection.start_stream(callback=lambda result, error: events.put((result, error)))
    results, errors = [], []
    try:
        connection.async_stream_infer("failing_stream", [kind_input(grpc, kind)])
        while not errors:
            result, error = events.get(timeout=30)
            (errors if error is not None else results).append(error if error is not None else result)
    finally:
        connection.stop_stream()
        connection.close()
    return results, errors


def failing_infer_error(triton: Any, address: str, kind: str) -> Any:
    """The InferenceServerException that `triton` (tritonclient.http or .grpc) raises for a `failing` infer."""
    from tritonclient.utils import InferenceServerException

    connection = triton.InferenceServerClient(address)
    try:
        with pytest.raises(InferenceServerException) as raised:
            connection.infer("failing", [kind_input(triton, kind)])
    finally:
        connection.close()
    return raised.value


@pytest.mark.parametrize("failure", FAILURES, ids=[failure.kind for failure in FAILURES])
def test_a_failing_non_decoupled_callable_answers_with_its_exceptions_text_and_status(served: Served,
                                                                                      failure: Failure):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    raised = failing_infer_error(http, f"127.0.0.1:{served.http_port}", failure.kind)
    assert (raised.status(), raised.message()) == (str(failure.http), failure.message)

    status, raw = post(served, "/v2/models/failing/infer", {"inputs": [
        {"name": "kind", "datatype": "BYTES", "shape": [1, 1], "data": [failure.kind]}]})
    assert (status, json.loads(raw)) == (failure.http, {"error": failure.message})

    raised = failing_infer_error(grpc, f"127.0.0.1:{served.grpc_port}", failure.kind)
    assert (raised.status(), raised.message()) == (failure.grpc, failure.message)


@pytest.mark.parametrize("failure", FAILURES, ids=[failure.kind for failure in FAILURES])
def test_a_failing_decoupled_callable_ends_its_stream_with_its_exceptions_text(served: Served, failure: Failure):
    results, errors = grpc_stream(served, failure.kind)
    assert results == [] and [(e.status(), e.message()) for e in errors] == [(None, failure.message)]

    status, raw = post(served, "/v2/models/failing_stream/generate_stream", {"kind": failure.kind})
    assert (status, sse_events(raw)) == (GENERATE_STREAM_STATUS, [{"error": failure.message}])


@pytest.mark.parametrize("kind", ["overloaded", "deadline"])
def test_a_stream_that_fails_after_a_response_ends_with_the_exceptions_text(served: Served, kind: str):
    results, errors = grpc_stream(served, AFTER_ONE + kind)
    assert [r.as_numpy("key")[0][0] for r in results] == [b"first"]
    assert [(e.status(), e.message()) for e in errors] == [(None, FAILURE[kind].message)]

    status, raw = post(served, "/v2/models/failing_stream/generate_stream", {"kind": AFTER_ONE + kind})
    events = sse_events(raw)
    assert status == 200 and events[-1] == {"error": FAILURE[kind].message}, (status, events)
    assert [event["key"] for event in events[:-1]] == ["first"]


def test_a_failing_callable_leaves_both_models_serving(served: Served):
    for failure in FAILURES:
        grpc_stream(served, failure.kind)
    three_ticks(served)
