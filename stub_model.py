"""The `model.py` of our Triton Python-backend stubs: PyTriton's own proxy model, plus cancellation reports.

Not imported by the server: `cancellation.install_stub_model()` copies this file into each model's version
folder as `model.py`, next to PyTriton's original renamed `pytriton_model.py`. The Python backend imports
the version folder as a package (`1.model`), so the relative import below finds PyTriton's file, whose
own relative imports find its siblings.

PyTriton 0.7 never asks Triton whether a request was cancelled (a gRPC client that stops its stream), so
the callable would generate for nobody. When $OPT_CANCEL_SOCKET is set, each PyTriton Request gets a
parameter naming its triton request, and a thread polls the in-flight triton requests' `is_cancelled()`,
sending each cancelled one's key as one datagram to that Unix socket (the server listens there).

PyTriton 0.7 also answers every failure of the callable with its whole traceback as an internal error.
Here each failed request gets its own error response instead: only the final exception's text, with a
code after its class (`triton_error`): bad parameters INVALID_ARG (HTTP 400), the engine's refusals
UNAVAILABLE (HTTP 503), the rest INTERNAL. The server process logs the whole traceback.

Every model, decoupled or not, answers through its requests' response senders
(`responding_through_senders`), so `execute` returns at once and one model instance holds any number of
requests. Without $OPT_CANCEL_SOCKET this is PyTriton's model with these two changes. Besides its
`_wrap_request`, `_requests` and handlers, this reads two more of PyTriton 0.7's internals:
`_requests_server._server._handle_responses_fn` and the decoupled flag of `initialize`'s model config.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import socket
import threading
from typing import Any, Callable

import triton_python_backend_utils as pb_utils  # type: ignore  # only exists inside the stub

from . import pytriton_model  # type: ignore  # PyTriton's proxy/model.py, unchanged

CANCEL_KEY_PARAMETER = "opt_cancel_key"  # keep equal to cancellation.CANCEL_KEY_PARAMETER
CANCEL_SOCKET_ENV = "OPT_CANCEL_SOCKET"  # keep equal to cancellation.CANCEL_SOCKET_ENV
POLL_INTERVAL_S = 0.25
POLLER_JOIN_S = 2.0

_REPORT_TO = os.environ.get(CANCEL_SOCKET_ENV)  # the server sets it before Triton starts; stubs inherit it
_counter = itertools.count(1)  # next() is atomic under the GIL: keys stay unique across threads

# Once a request's final response is sent, Triton frees what is_cancelled() reads (the response factory).
# So is_cancelled() is only called under this lock, on requests not yet `_closing`, and a requests_id
# joins `_closing` under it before PyTriton sends the final response or lets execute() return.
_lock = threading.Lock()
_keys: dict[int, tuple[Any, str]] = {}  # id(triton request) -> (the request, its key); the reference pins the id
_closing: set[bytes] = set()  # PyTriton requests_ids whose final responses may be on their way


# The code of an error response (a `pb_utils.TritonError` attribute), by the qualified name of the final
# exception of the callable's traceback; INTERNAL for any other. Names, not values: pb_utils gets its
# TritonError only once the stub runs the model, not while Triton auto-completes the config.
ERROR_CODES = {
    "pytriton.exceptions.PyTritonBadParameterError": "INVALID_ARG",  # HTTP 400
    "engine.Overloaded": "UNAVAILABLE",  # HTTP 503: the client may retry later, or on another replica
    "engine.Draining": "UNAVAILABLE",
    "engine.ShuttingDown": "UNAVAILABLE",
    "engine.Cancelled": "CANCELLED",  # INTERNAL where this Triton has none
    "engine.DeadlineExceeded": "INTERNAL",  # Triton 2.51 has no DEADLINE_EXCEEDED; the text says "timed out: ..."
}
_TRACEBACK_HEADER = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"(?P<name>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?", re.DOTALL)


def final_exception(payload: str) -> tuple[str, str] | None:
    """(qualified class name, message) of the last exception of a `traceback.format_exception` text.

    Its line follows the last traceback's indented frames (a chained exception's traceback comes last);
    a message of several lines keeps them all. None when the text is no such traceback.
    """
    lines = payload.rstrip("\n").split("\n")
    headers = [i for i, line in enumerate(lines) if line == _TRACEBACK_HEADER]
    if not headers:
        return None
    first = headers[-1] + 1
    while first < len(lines) and (lines[first].startswith(" ") or not lines[first]):
        first += 1
    match = _EXCEPTION_LINE.fullmatch("\n".join(lines[first:]))
    if match is None:
        return None
    return match["name"], match["message"] or match["name"]  # an exception without text: its name


def triton_error(payload: str) -> Any:
    """The TritonError for an error PyTriton sends from the callable (a traceback): the text and code of
    its final exception; anything else, the whole payload as INTERNAL."""
    internal = pb_utils.TritonError.INTERNAL
    parsed = final_exception(payload)
    if parsed is None:
        return pb_utils.TritonError(payload, internal)
    name, message = parsed
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, ERROR_CODES.get(name, "INTERNAL"), internal))


class _PbUtilsForPyTriton:
    """`pb_utils` as PyTriton's proxy module sees it: the real one, except that the TritonError its
    decoupled handler makes of an error payload carries the final exception's text and code."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pb_utils, name)

    @staticmethod
    def TritonError(error: str, code: int | None = None) -> Any:  # noqa: N802  (pb_utils' name)
        return triton_error(error) if code is None else pb_utils.TritonError(error, code)


def _wrap_request_with_key(original: Callable[..., Any]) -> Callable[..., Any]:
    """PyTriton's request wrapping, then our key in the parameters, replacing whatever a client sent there."""
    @functools.wraps(original)
    def wrap_request(self: Any, triton_request: Any, inputs: Any, span: Any = None) -> Any:
        request = original(self, triton_request, inputs, span)
        key = f"{os.getpid()}-{next(_counter)}"
        request.parameters = {**(request.parameters or {}), CANCEL_KEY_PARAMETER: key}
        with _lock:
            _keys[id(triton_request)] = (triton_request, key)
        return request

    return wrap_request


class _MarkFinal:
    """The responses queue PyTriton's handlers read, marking the requests closing when the last item comes."""

    def __init__(self, queue: Any, requests_id: bytes):
        self._queue = queue
        self._requests_id = requests_id

    async def get(self) -> Any:
        item = await self._queue.get()
        flags, _ = item
        if flags & pytriton_model.PyTritonResponseFlags.EOS:
            with _lock:  # waits out an is_cancelled() in progress on these requests
                _closing.add(self._requests_id)
        return item

    def task_done(self) -> None:
        self._queue.task_done()


def _marking_final(handle_responses: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handle_responses)
    async def wrapper(self: Any, scope: dict[str, Any], responses_queue: Any, responses_future: Any) -> Any:
        return await handle_responses(self, scope, _MarkFinal(responses_queue, scope["requests_id"]),
                                      responses_future)

    return wrapper


class _OneFinalResponse:
    """The responses queue of a model that is not decoupled: its one response comes with the final flag.

    PyTriton sends the callable's answer, then an empty end-of-stream item. Sent as they come (a response,
    then an empty final one), a gRPC stream to a non-decoupled model never delivers the response; so the
    answer is held until its end comes and goes out with it, as one final response.
    """

    def __init__(self, queue: Any):
        self._queue = queue

    async def get(self) -> Any:
        flags_of = pytriton_model.PyTritonResponseFlags
        flags, payload = await self._queue.get()
        if flags & (flags_of.EOS | flags_of.ERROR):
            return flags, payload
        end_flags, end_payload = await self._queue.get()
        self._queue.task_done()  # the held answer's: the handler sees one item for the two
        if end_flags & flags_of.ERROR:
            return end_flags, end_payload  # an error after the answer: the error goes out
        if not end_flags & flags_of.EOS:  # PyTriton's own handler asserts here
            return (flags_of.ERROR | flags_of.EOS,
                    b"the callable of a model that is not decoupled gave more than one answer")
        return end_flags, payload  # the end item carries nothing

    def task_done(self) -> None:
        self._queue.task_done()


def _answering_once(handle_responses: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(scope: dict[str, Any], responses_queue: Any, responses_future: Any) -> Any:
        return await handle_responses(scope, _OneFinalResponse(responses_queue), responses_future)

    return wrapper


def _in_flight(model: pytriton_model.TritonPythonModel) -> list[tuple[bytes, Any, str]]:
    """(requests_id, triton request, key) of each wrapped request in flight; forgets finished ones.

    Under the lock: a key is registered after its request entered PyTriton's map, so a known key missing
    from this copy of the map is finished, never one just starting.
    """
    with _lock:
        batches = list((model._requests or {}).items())
        alive = {id(request) for _, requests in batches for request in requests}
        for request_id in [i for i in _keys if i not in alive]:
            del _keys[request_id]
        _closing.intersection_update(requests_id for requests_id, _ in batches)
        return [(requests_id, request, _keys[id(request)][1])
                for requests_id, requests in batches for request in requests if id(request) in _keys]


def _is_cancelled(requests_id: bytes, request: Any) -> bool:
    with _lock:
        return requests_id not in _closing and request.is_cancelled()


def _report_cancellations(model: pytriton_model.TritonPythonModel, path: str, stop: threading.Event) -> None:
    """The poller: never raises, never blocks on the listener (a full socket drops the report)."""
    reported: set[str] = set()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while not stop.wait(POLL_INTERVAL_S):
            try:
                in_flight = _in_flight(model)
                reported.intersection_update(key for _, _, key in in_flight)
                for requests_id, request, key in in_flight:
                    if key not in reported and _is_cancelled(requests_id, request):
                        reported.add(key)
                        _send(sock, key, path)
            except Exception as error:
                pb_utils.Logger.log_warn(f"cancellation poll failed: {error!r}")


def _send(sock: socket.socket, key: str, path: str) -> None:
    """One datagram per key; a listener that is gone or full costs this one report, never the poller."""
    try:
        sock.sendto(key.encode(), path)
    except OSError as error:
        pb_utils.Logger.log_warn(f"cancellation of {key} not reported to {path}: {error!r}")


pytriton_model.pb_utils = _PbUtilsForPyTriton()
if _REPORT_TO:
    pytriton_model.TritonRequestsServer._wrap_request = _wrap_request_with_key(
        pytriton_model.TritonRequestsServer._wrap_request)
    pytriton_model.DecoupledResponsesHandler.handle_responses = _marking_final(  # every model's, see above
        pytriton_model.DecoupledResponsesHandler.handle_responses)


def responding_through_senders(args: dict[str, str]) -> dict[str, str]:
    """The stub's arguments with the model read as decoupled by PyTriton's proxy (not by Triton).

    PyTriton's non-decoupled path blocks `execute` until the callable's answer comes, so a model instance
    holds one request at a time and Triton queues the rest: the engine never saw more of `OPT`'s requests
    than its instances, however many decode slots were free. Its decoupled path hands the requests over,
    returns from `execute` at once and answers through each request's response sender, which Triton's
    Python backend also allows a non-decoupled model (one response, then the final flag). So each
    instance takes any number of requests, and each request still gets its own answer or error. (The
    model that is not decoupled then sends its one response with the final flag: `_OneFinalResponse`.)
    """
    config = json.loads(args["model_config"])
    config.setdefault("model_transaction_policy", {})["decoupled"] = True
    return {**args, "model_config": json.dumps(config)}


class TritonPythonModel(pytriton_model.TritonPythonModel):
    """PyTriton's proxy model with a cancellation poller beside it."""

    def initialize(self, args: dict[str, str]) -> None:
        self._cancel_stop = threading.Event()
        self._cancel_poller: threading.Thread | None = None
        decoupled = json.loads(args["model_config"]).get("model_transaction_policy", {}).get("decoupled", False)
        super().initialize(responding_through_senders(args))
        if not decoupled:  # the handler PyTriton's requests server calls for every batch of requests
            server = self._requests_server._server
            server._handle_responses_fn = _answering_once(server._handle_responses_fn)
        if _REPORT_TO:
            self._cancel_poller = threading.Thread(target=_report_cancellations, name="opt-cancel-poller",
                                                   args=(self, _REPORT_TO, self._cancel_stop), daemon=True)
            self._cancel_poller.start()

    def execute(self, triton_requests: list[Any]) -> Any:
        try:
            return super().execute(triton_requests)
        except Exception:
            # PyTriton may leave these in its map while Triton answers them with the error and frees them
            with _lock:
                _closing.update(i for i, r in list(self._requests.items()) if r is triton_requests)
            raise

    def finalize(self) -> None:
        self._cancel_stop.set()
        if self._cancel_poller is not None:  # before PyTriton's shutdown answers what is left
            self._cancel_poller.join(POLLER_JOIN_S)
        super().finalize()
