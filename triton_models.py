"""Rank 0's Triton side: request parsing, text streaming, the models' callables, Triton's start and stop.

A request's rows are decoded, checked against the optional-input table (`protocol.py`) and tokenized
here; the scheduler (`engine.py`) generates them; the callables hand the text back to Triton.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sysconfig
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import psutil

from plan import Request, Sampling
from protocol import MODEL_NAME, OPTIONAL_INPUTS, STREAM_MODEL_NAME
from reaper import reap_leftovers, stub_model_folders

LOGGER = logging.getLogger("server")


class TritonFlags(Protocol):
    """The flags Triton starts with (server.ServerConfig has them)."""

    bind_address: str
    http_port: int
    grpc_port: int
    metrics_port: int
    access_token: str | None
    model_instances: int
    max_batch_size: int
    verbose: bool

def ensure_libpython_on_path() -> None:
    """Puts this interpreter's libpython first on LD_LIBRARY_PATH for Triton's Python backend stub.

    The stub links libpython dynamically; with a pyenv (or other non-system) Python it otherwise loads
    the system's, and every model load fails ('_thread.RLock' object has no attribute
    '_recursion_count'). Triton and the stub inherit this process's environment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and (not paths or paths[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in paths if p != libdir]])



class BadRequest(ValueError):
    """A request that cannot be served; its message goes back to the client."""




@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt of a Triton request, validated and tokenized."""

    prompt: str
    request: Any  # plan.Request
    timeout: float | None  # seconds from arrival, the flag's limit applied; None: no deadline


class RequestParser:
    """Decodes and checks every row of one Triton request; the first problem is a BadRequest naming the row."""

    def __init__(self, tokenizer: Any, max_positions: int, vocab_size: int, *, max_timeout: float | None = None):
        self.tokenizer = tokenizer
        self.max_timeout = max_timeout  # --request-timeout; None: no limit
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        self._seeds = np.random.default_rng()

    def parse(self, inputs: Any) -> list[Row]:
        # input: [B, 1] bytes; output_length and each optional input: [B, 1] (Triton checks dtypes and shapes).
        prompts, lengths = inputs["input"], inputs["output_length"]
        settings = {o.name: inputs[o.name] for o in OPTIONAL_INPUTS if inputs.get(o.name) is not None}
        for name, array in {"output_length": lengths, **settings}.items():
            if array.shape[0] != prompts.shape[0]:
                raise BadRequest(f"input has {prompts.shape[0]} rows but {name} has {array.shape[0]}")
        if prompts.shape[0] == 0:
            raise BadRequest("the request has no rows")
        return [self._row(i, prompts.reshape(-1)[i], int(lengths.reshape(-1)[i]),
                          {name: array.reshape(-1)[i] for name, array in settings.items()})
                for i in range(prompts.shape[0])]

    def _row(self, i: int, raw: Any, length: int, given: dict[str, Any]) -> Row:
        raw = raw if isinstance(raw, bytes) else bytes(raw)
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequest(f"row {i}: input is not valid UTF-8 ({error})") from None
        if not prompt:
            raise BadRequest(f"row {i}: input is empty")
        return self.row(f"row {i}", prompt, length, given)

    def row(self, where: str, prompt: str, length: int, given: dict[str, Any], *,
            tokens: Sequence[int] | None = None, length_name: str = "output_length") -> Row:
        """One checked row: `prompt` tokenized (or its `tokens` as given), its length and settings checked.
        `where` and `length_name` name the row and its length in an error (the OpenAI API calls it max_tokens)."""
        if length < 1:
            raise BadRequest(f"{where}: {length_name} must be at least 1, got {length}")
        tokens = tuple(self.tokenizer.encode(prompt)) if tokens is None else tuple(tokens)
        if len(tokens) + length > self.max_positions:
            raise BadRequest(f"{where}: prompt of {len(tokens)} tokens plus {length_name} {length} exceeds "
                             f"the model's {self.max_positions} positions")
        return Row(prompt, Request(tokens, length, self._sampling(where, given)), self._timeout(given))

    def _timeout(self, given: dict[str, Any]) -> float | None:
        """The row's deadline in seconds: its timeout_seconds (checked with the other inputs), at most the flag's."""
        limits = [float(v) for v in (given.get("timeout_seconds"), self.max_timeout) if v is not None]
        return min(limits) if limits else None

    def _sampling(self, where: str, given: dict[str, Any]) -> Sampling:
        """The row's sampling inputs, each checked against the table and its default filled in."""
        values = {}
        for option in OPTIONAL_INPUTS:
            value = given.get(option.name, option.default)
            problem = option.problem(value, vocab_size=self.vocab_size) if value is not None else None
            if problem:
                raise BadRequest(f"{where}: {option.name} {value} {problem}")
            if option.sampling:
                values[option.name] = None if value is None else np.asarray(value, option.dtype).item()
        if values["seed"] is None:  # unseeded sampling differs every time; rank 0 draws for every rank
            values["seed"] = int(self._seeds.integers(0, 2**63))
        return Sampling(**values)


class TextStream:
    """Turns a row's token ids into text pieces as they come, never splitting a multi-byte character.

    Byte-level BPE decodes a run of tokens to exactly the bytes of its tokens, so once the text of the
    tokens since the last piece ends in a whole character it is a piece of its own and those tokens are
    never decoded again; a text that ends in U+FFFD (an incomplete character) waits for more tokens.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def push(self, token: int) -> str:
        self._held.append(token)
        text = self._tokenizer.decode(self._held)
        if text.endswith("\ufffd"):
            return ""
        self._held = []
        return text

    def finish(self) -> str:
        """Whatever is held at the end (an incomplete character decodes as U+FFFD, as in the full text)."""
        text = self._tokenizer.decode(self._held) if self._held else ""
        self._held = []
        return text


def bytes_output(texts: Sequence[str]) -> dict[str, np.ndarray]:
    return {"output": np.array([[t.encode("utf-8")] for t in texts], dtype=object)}  # [B, 1] bytes


def rows_or_reject(parser: RequestParser, request: Any) -> list[Row]:
    """The rows of one PyTriton request; a BadRequest goes back to the client as PyTriton's bad-parameter error."""
    from pytriton.exceptions import PyTritonBadParameterError

    try:
        return parser.parse(dict(request.items()))
    except BadRequest as error:
        raise PyTritonBadParameterError(str(error)) from None


def submit_rows(scheduler: Any, rows: Sequence[Row], on_token: Callable[[int], None] | None = None) -> list[Any]:
    """Queues the rows in the engine; a full queue or a drain refuses them at once (engine.Overloaded or
    engine.Draining, which our stub model turns into Triton's UNAVAILABLE, HTTP 503)."""
    return scheduler.submit_all([row.request for row in rows], on_token, timeouts=[row.timeout for row in rows])


def cancel_when_gone(cancels: Any, request: Any, scheduler: Any, sequences: Sequence[Any]) -> Callable[[], None]:
    """Ends the request's rows, freeing their slots, once Triton reports its client gone; returns the unwatch."""
    import cancellation
    import engine

    def cancel() -> None:
        for sequence in sequences:
            scheduler.cancel(sequence, engine.Cancelled("cancelled: the client closed the request"))

    return cancels.watch(cancellation.cancel_key(request), cancel)


def make_infer_fn(scheduler: Any, parser: RequestParser, cancels: Any):
    """The callable of model `OPT` (one request at a time per model instance): prompt + generated text."""

    async def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:  # Triton passes one request at a time: the model has no dynamic batcher
            rows = rows_or_reject(parser, request)
            sequences = submit_rows(scheduler, rows)
            unwatch = cancel_when_gone(cancels, request, scheduler, sequences)
            try:
                tokens = await asyncio.gather(*(asyncio.wrap_future(s.future) for s in sequences))
            finally:  # cancelled (Triton stopping, the client gone): nobody reads the rows, so they end
                unwatch()
                free_unfinished(scheduler, sequences, "cancelled: the request's call was cancelled")
            responses.append(bytes_output([row.prompt + parser.tokenizer.decode(t) for row, t in zip(rows, tokens)]))
        return responses

    return infer


def make_stream_fn(scheduler: Any, parser: RequestParser, cancels: Any):
    """The callable of the decoupled model `OPT_stream`: one response per new piece of text, then the end.

    It is a coroutine generator, so PyTriton's event loop serves any number of streams at once; the
    scheduler's thread hands each token over with call_soon_threadsafe and nothing blocks the loop.
    """
    from pytriton.exceptions import PyTritonBadParameterError

    async def stream(requests: list[Any]):
        if len(requests) != 1:
            raise PyTritonBadParameterError(f"{STREAM_MODEL_NAME} takes one request at a time, got {len(requests)}")
        rows = rows_or_reject(parser, requests[0])
        if len(rows) != 1:
            raise PyTritonBadParameterError(f"{STREAM_MODEL_NAME} streams one row per request, got {len(rows)}")
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        (sequence,) = submit_rows(scheduler, rows, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
        sequence.future.add_done_callback(lambda _: call_soon_if_open(loop, tokens.put_nowait, None))
        unwatch = cancel_when_gone(cancels, requests[0], scheduler, [sequence])
        try:
            text = TextStream(parser.tokenizer)
            ended = False
            while not ended:
                # Whatever tokens came meanwhile make one piece: a loop that falls behind sends fewer responses.
                batch = [await tokens.get()]
                while not tokens.empty():
                    batch.append(tokens.get_nowait())
                ended = batch[-1] is None
                if piece := "".join(text.push(t) for t in batch if t is not None):
                    yield [bytes_output([piece])]
            sequence.future.result()  # raises the engine's error, if any
            yield [bytes_output([text.finish()])]
        finally:  # also when the generator is closed or its coroutine cancelled: the row is nobody's
            unwatch()
            free_unfinished(scheduler, [sequence], "cancelled: the stream was closed")

    return stream


def free_unfinished(scheduler: Any, sequences: Sequence[Any], why: str) -> None:
    """Ends the rows nobody waits for any more, freeing their decode slots before the next step."""
    import engine

    for sequence in sequences:
        if not sequence.finished:  # its future may be done already: cancelled with the task that awaited it
            scheduler.cancel(sequence, engine.Cancelled(why))


def call_soon_if_open(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Hands `callback` to the loop's thread; a loop already closed (Triton stopped) has nobody left to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass




TRITON_START_ATTEMPTS = 3
# Triton's own wait for requests in flight when it stops. The drain (--exit-timeout) has answered every
# request by then, so this only bounds a stub that is slow to unload; a kill -9 of the server has the
# reaper instead.
TRITON_EXIT_TIMEOUT_S = 5


PYTRITON_POLL_S = 0.05  # how often PyTriton's start asks Triton whether the server and each model are ready


class _PollingClock:
    """`time` for PyTriton's readiness waits (pytriton.client.utils), polling every PYTRITON_POLL_S, not 1 s.

    PyTriton waits for the server and then for each model with `time.sleep(min(1.0, left))` between checks;
    on a restart that is otherwise ready in a few seconds, those sleeps were 2 to 3 of them.
    """

    time = staticmethod(time.time)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, PYTRITON_POLL_S))


def bracket_ipv6_endpoints() -> None:
    """Makes PyTriton's URLs of its own server (its readiness checks, its clients) valid for IPv6 addresses.

    PyTriton 0.7 writes f"http://{address}:{port}" from the address Triton was given, so `--bind-address ::`
    gave `http://:::8000` (or `http://ipv6:::8000`) and the start failed with "Invalid url"; its TritonUrl then drops the brackets that urlparse took off, and
    tritonclient reads "::1:8000" as host ":" and port ":1:8000". An IPv6 address gets its brackets in
    both places, and "::" (every interface) is reached at ::1, as 0.0.0.0 is at 127.0.0.1.
    """
    from pytriton.client.utils import TritonUrl
    from pytriton.utils import endpoint_utils

    original = endpoint_utils.get_endpoint
    if getattr(original, "brackets_ipv6", False):
        return

    def get_endpoint(server_config: Any, endpoint: Any) -> str:
        scheme, rest = original(server_config, endpoint).split("://", 1)
        host, port = rest.rsplit(":", 1)
        if ":" in host:  # "ipv6:<address>" (HTTP, metrics) or "[<address>]" (gRPC): see triton_addresses
            host = host.removeprefix("ipv6:").strip("[]")
            host = "[::1]" if host.strip(":0") == "" else f"[{host}]"
        return f"{scheme}://{host}:{port}"

    def host_and_port(url: Any) -> str:
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"{host}:{url.port}"

    get_endpoint.brackets_ipv6 = True  # type: ignore[attr-defined]
    endpoint_utils.get_endpoint = get_endpoint
    TritonUrl.without_scheme = property(host_and_port)
    TritonUrl.with_scheme = property(lambda url: f"{url.scheme}://{host_and_port(url)}")


def triton_addresses(address: str) -> tuple[str, str]:
    """(HTTP and metrics, gRPC) forms of the bind address, as Triton 2.51 reads them.

    An IPv4 address or a host name goes to both bare. For an IPv6 address the HTTP services (libevhtp)
    need the prefix "ipv6:" (bare "::" bound 255.255.255.255), and the gRPC service its brackets (Triton
    joins address and port with ":" as a gRPC target: ":::8001" could not be bound).
    """
    if ":" not in address:
        return address, address
    bare = address.strip("[]")
    return f"ipv6:{bare}", f"[{bare}]"


def start_triton(args: TritonFlags, infer: Any, stream: Any) -> Any:
    """Starts Triton with the models `OPT` and `OPT_stream` bound, trying again when a model fails to load.

    PyTriton 0.7's model instances race for a 1-second handshake with the first instance's stub;
    on a loaded machine the others can time out or be refused, and the load fails as a whole.
    """
    import pytriton.client.utils
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import TRITON_ACCESS_HEADER, Triton, TritonConfig, TritonSecurityConfig

    pytriton.client.utils.time = _PollingClock  # its only uses of `time` are these waits (PyTriton 0.7)
    bracket_ipv6_endpoints()

    http_address, grpc_address = triton_addresses(args.bind_address)
    triton_config = TritonConfig(
        http_address=http_address, http_port=args.http_port,
        grpc_address=grpc_address, grpc_port=args.grpc_port,
        metrics_address=http_address, metrics_port=args.metrics_port,
        exit_timeout_secs=TRITON_EXIT_TIMEOUT_S, log_verbose=1 if args.verbose else 0,
    )
    # PyTriton's restricted endpoints stay protected; an empty token would lift the protection, so it means "random".
    security = TritonSecurityConfig(access_token=args.access_token or None)
    LOGGER.info("Triton's restricted endpoints (%s) require the header %s: %s",
                ", ".join(security.restricted_endpoints), TRITON_ACCESS_HEADER,
                "the token given" if args.access_token else "a random token, not printed")
    inputs = [Tensor(name="input", dtype=bytes, shape=(1,)), Tensor(name="output_length", dtype=np.int64, shape=(1,)),
              *(Tensor(name=o.name, dtype=o.dtype, shape=(1,), optional=True) for o in OPTIONAL_INPUTS)]
    outputs = [Tensor(name="output", dtype=bytes, shape=(1,))]
    for attempt in range(1, TRITON_START_ATTEMPTS + 1):
        triton = Triton(config=triton_config, security_config=security)
        try:
            triton.bind(model_name=MODEL_NAME, infer_func=[infer] * args.model_instances, inputs=inputs,
                        outputs=outputs, config=ModelConfig(max_batch_size=args.max_batch_size, batcher=None),
                        strict=True)
            # Decoupled: the stub hands each request over and returns at once, so one instance serves any
            # number of streams (the callable is a coroutine generator on PyTriton's event loop).
            triton.bind(model_name=STREAM_MODEL_NAME, infer_func=stream, inputs=inputs, outputs=outputs,
                        config=ModelConfig(max_batch_size=1, batcher=None, decoupled=True), strict=True)
            triton.run()
            return triton
        except Exception as error:  # PyTriton passes tritonclient's load error through
            stop_triton(triton)
            if attempt == TRITON_START_ATTEMPTS:
                raise
            LOGGER.warning("Triton could not load the model (attempt %d of %d), starting it again: %s",
                           attempt, TRITON_START_ATTEMPTS, str(error).splitlines()[0])
    raise AssertionError("unreachable")


def stop_triton(triton: Any, *, spare: Sequence[int] = ()) -> None:
    """Stops Triton, then ends whatever of it outlives the stop and removes its model copies.

    `spare`: child processes that are not Triton's (the stub reaper, which outlives this stop).
    """
    processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in spare]
    folders = stub_model_folders(processes)
    triton.stop()
    reap_leftovers(processes, folders)
    LOGGER.info("Triton stopped")
