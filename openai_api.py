"""Rank 0's OpenAI-compatible front end: /v1/completions (plain and streamed), /v1/models, health, beside Triton.

It shares the request checks (`triton_models.RequestParser`, over `protocol.OPTIONAL_INPUTS`) and the
scheduler with the Triton models, so a prompt gets the same text over both APIs. It runs aiohttp on an
event loop of its own in one thread: aiohttp is asyncio-native, streams server-sent events through a
plain StreamResponse, cancels a handler whose client went away, and was already in our dependency tree.
Imports no jax.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import numpy as np

from aiohttp import web

import engine
from protocol import OPTIONAL_INPUTS
from triton_models import BadRequest, RequestParser, Row, TextStream, call_soon_if_open, free_unfinished

LOGGER = logging.getLogger("server")
API_KEY_ENV = "OPT_SERVER_API_KEY"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI allows
RETRY_AFTER_S = "1"
STOP_WAIT_S = 10.0


class ApiError(Exception):
    """An error in OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def engine_error(error: BaseException) -> ApiError:
    """What a row's end by the engine (or a refusal) means to an OpenAI client."""
    if isinstance(error, engine.Refused):  # overloaded or draining: come back later
        return ApiError(503, str(error), kind="server_error", code="unavailable", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(error, engine.DeadlineExceeded):
        return ApiError(504, str(error), kind="timeout_error", code="timeout")
    return ApiError(500, str(error), kind="server_error")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One checked /v1/completions request: its rows (`n` per prompt, prompt-major: choice k is row k) and
    how to answer."""

    model: str
    rows: tuple[Row, ...]
    n: int  # choices per prompt
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[name] if it has one of `kinds` (a bool is no number here); absent or null: `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{name} must be {names}, got {json.dumps(value)}", param=name)
    return value


OPTION_KINDS: dict[str, tuple[type, ...]] = {"float32": (int, float), "int32": (int,), "int64": (int,), "bool": (bool,)}


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """The optional inputs the body gives (the same names as the Triton inputs), their JSON types checked."""
    given = {}
    for option in OPTIONAL_INPUTS:
        value = _typed(body, option.name, OPTION_KINDS[np.dtype(option.dtype).name])
        if value is not None:
            given[option.name] = value
    return given


def _prompts(body: dict[str, Any], vocab_size: int) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids, and not empty",
                       param="prompt")
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "prompt must not be empty", param="prompt")
        elif not (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
            raise ApiError(400, f"prompt must be a string or a list of token ids, got {json.dumps(p)[:80]}",
                           param="prompt")
        elif not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"prompt has token ids outside the vocabulary [0, {vocab_size})", param="prompt")
    return prompts


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}, "
                            f"got {json.dumps(stop)}", param="stop")
    return tuple(stops)


def _unsupported(body: dict[str, Any]) -> None:
    """What we cannot give honestly is refused, never ignored."""
    if body.get("logprobs") is not None:
        raise ApiError(400, "logprobs are not supported: the engine returns token ids only", param="logprobs")
    if _typed(body, "best_of", (int,), 1) != 1:
        raise ApiError(400, "best_of must be 1", param="best_of")
    if body.get("suffix") is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")


def parse_completion(body: Any, parser: RequestParser, names: Sequence[str], max_batch_size: int) -> Completion:
    """Checks a /v1/completions body; the first problem is an ApiError naming its parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = _typed(body, "model", (str,))
    if model is None:
        raise ApiError(400, "model is required", param="model")
    if model not in names:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {', '.join(names)}",
                       param="model", code="model_not_found")
    _unsupported(body)
    max_tokens = _typed(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS)
    stream = _typed(body, "stream", (bool,), False)
    options = _typed(body, "stream_options", (dict,), {})
    given = _settings(body)
    prompts = _prompts(body, parser.vocab_size)
    n = _typed(body, "n", (int,), 1)
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", param="n")
    if len(prompts) * n > max_batch_size:
        raise ApiError(400, f"{len(prompts)} prompts of {n} choices each exceed --max-batch-size {max_batch_size}",
                       param="n" if n > 1 else "prompt")
    rows = []
    for i, prompt in enumerate(prompts):
        text, tokens = (prompt, None) if isinstance(prompt, str) else (parser.tokenizer.decode(prompt), prompt)
        for choice in _choice_settings(given, n):
            try:
                rows.append(parser.row(f"prompt {i}", text, max_tokens, choice, tokens=tokens,
                                       length_name="max_tokens"))
            except BadRequest as error:
                raise ApiError(400, str(error), param=_named_param(str(error))) from None
            tokens = rows[-1].request.tokens  # a text prompt is tokenized once, for its first choice
    return Completion(model, tuple(rows), n, _stop(body), stream, bool(options.get("include_usage")),
                      _typed(body, "echo", (bool,), False))


def _choice_settings(given: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The settings of a prompt's n choices: a given seed s is s, s + 1, ... so that seeded choices differ
    from each other yet repeat from one request to the next (unseeded ones each draw their own)."""
    if "seed" not in given:
        return [given] * n
    return [given | {"seed": (given["seed"] + j) % 2**63} for j in range(n)]


def _named_param(message: str) -> str:
    """The parameter a RequestParser message is about (it names it after the row)."""
    for name in ("max_tokens", *(o.name for o in OPTIONAL_INPUTS)):
        if f": {name} " in message:
            return name
    return "prompt"


@dataclasses.dataclass
class RowText:
    """One row's generated text as it comes, cut before the first stop string (which is not returned)."""

    stop: tuple[str, ...]
    text: str = ""
    sent: int = 0  # characters of `text` handed out
    tokens: int = 0
    stopped: bool = False

    def add(self, piece: str) -> str:
        """The text that can go out now: all of it, less a tail that may still become a stop string."""
        self.text += piece
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(max(self.sent, len(self.text) - hold))

    def rest(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], end
        return out


class Generation:
    """The rows of one completion in the engine; `pieces` yields (row, text) as tokens come, then the end."""

    def __init__(self, scheduler: engine.Scheduler, parser: RequestParser, completion: Completion):
        self.scheduler, self.parser, self.completion = scheduler, parser, completion
        loop = asyncio.get_running_loop()
        self._tokens: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in completion.rows]
        listeners = [lambda t, q=q: loop.call_soon_threadsafe(q.put_nowait, t) for q in self._tokens]
        try:
            self.sequences = scheduler.submit_all([r.request for r in completion.rows], timeouts=[
                r.timeout for r in completion.rows], listeners=listeners, api="openai")
        except engine.Refused as error:
            raise engine_error(error) from None
        for sequence, queue in zip(self.sequences, self._tokens):
            sequence.future.add_done_callback(lambda _, q=queue: call_soon_if_open(loop, q.put_nowait, None))
        self.texts = [RowText(completion.stop) for _ in completion.rows]

    async def row_pieces(self, i: int) -> AsyncIterator[str]:
        """Row i's text pieces (whole characters); ends at its EOS, length or stop string."""
        text, decoder, queue = self.texts[i], TextStream(self.parser.tokenizer), self._tokens[i]
        while not text.stopped:
            token = await queue.get()
            if token is None:
                break
            text.tokens += 1
            if piece := text.add(decoder.push(token)):
                yield piece
        if text.stopped:  # the rest of its tokens are nobody's: free the slot now
            self.scheduler.end_early(self.sequences[i])
            return
        error = self.sequences[i].future.exception()
        if error is not None:
            raise engine_error(error)
        if piece := text.add(decoder.finish()) + text.rest():
            yield piece

    def finish_reason(self, i: int) -> str:
        text = self.texts[i]
        return "length" if not text.stopped and text.tokens >= self.completion.rows[i].request.max_new_tokens \
            else "stop"

    def usage(self) -> dict[str, int]:
        # A prompt counts once, whatever its number of choices (as OpenAI counts it).
        prompt = sum(len(r.request.tokens) for r in self.completion.rows[::self.completion.n])
        completion = sum(t.tokens for t in self.texts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        free_unfinished(self.scheduler, self.sequences, "cancelled: the OpenAI client went away")


def _choice(i: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _envelope(completion: Completion, rid: str, created: int, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": completion.model, **fields}


async def answer_whole(generation: Generation, rid: str, created: int) -> web.Response:
    completion = generation.completion

    async def row_text(i: int) -> str:
        return "".join([piece async for piece in generation.row_pieces(i)])

    texts = await asyncio.gather(*(row_text(i) for i in range(len(completion.rows))))
    choices = [_choice(i, (row.prompt if completion.echo else "") + text, generation.finish_reason(i))
               for i, (row, text) in enumerate(zip(completion.rows, texts))]
    return web.json_response(_envelope(completion, rid, created, choices=choices, usage=generation.usage()))


async def answer_stream(request: web.Request, generation: Generation, rid: str, created: int) -> web.StreamResponse:
    """Server-sent events: a chunk per piece of a row's text, each row's end, the usage if asked, [DONE]."""
    completion = generation.completion
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    events: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def feed(i: int) -> None:
        try:
            if completion.echo:
                await events.put((i, completion.rows[i].prompt, None))
            async for piece in generation.row_pieces(i):
                await events.put((i, piece, None))
            await events.put((i, None, None))
        except ApiError as error:
            await events.put((i, None, error))

    async def send(payload: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(payload)}\n\n".encode())

    feeders = [asyncio.ensure_future(feed(i)) for i in range(len(completion.rows))]
    try:
        for _ in range(len(completion.rows)):
            while True:
                i, piece, error = await events.get()
                if error is not None:
                    await send(error.body())
                elif piece is not None:
                    await send(_envelope(completion, rid, created, choices=[_choice(i, piece, None)]))
                    continue
                else:
                    await send(_envelope(completion, rid, created, choices=[_choice(i, "", generation.finish_reason(i))]))
                break
        if completion.include_usage:
            await send(_envelope(completion, rid, created, choices=[], usage=generation.usage()))
        await response.write(b"data: [DONE]\n\n")
    finally:
        for feeder in feeders:
            feeder.cancel()
    return response


@dataclasses.dataclass(frozen=True)
class FrontEndFlags:
    """What the front end is started with (server.py fills it from its flags)."""

    bind_address: str
    port: int
    names: tuple[str, ...]  # the model names a request may ask for; the first is --model-name
    api_key: str | None
    max_positions: int
    max_batch_size: int  # prompts per request, as Triton's max_batch_size bounds a request's rows


def make_app(scheduler: engine.Scheduler, parser: RequestParser, flags: FrontEndFlags,
             ready: Callable[[], bool]) -> web.Application:
    """The aiohttp application: routes, the API key check and OpenAI's error body for every failure."""
    created = int(time.time())

    @web.middleware
    async def errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            if flags.api_key and request.path.startswith("/v1/") and \
                    request.headers.get("Authorization") != f"Bearer {flags.api_key}":
                raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                               code="invalid_api_key")
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:
            return ApiError(error.status, error.reason, kind="not_found_error" if error.status == 404
                            else "invalid_request_error").response()

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError as error:
            raise ApiError(400, f"the body is not JSON: {error}") from None
        completion = parse_completion(body, parser, flags.names, flags.max_batch_size)
        generation = Generation(scheduler, parser, completion)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if completion.stream:
                return await answer_stream(request, generation, rid, now)
            return await answer_whole(generation, rid, now)
        finally:  # also a client gone (the handler cancelled) or a stream's write failing: free the slots
            generation.close()

    async def chat(request: web.Request) -> web.Response:
        raise ApiError(404, "chat completions are not served: OPT is a base model with no chat template; use "
                            "/v1/completions with a plain prompt", kind="not_found_error", code="no_chat_template")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "opt-jax", "root": flags.names[0],
             "max_model_len": flags.max_positions} for name in flags.names]})

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def readiness(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503, headers={"Retry-After": RETRY_AFTER_S})

    app = web.Application(middlewares=[errors])
    app.add_routes([web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat),
                    web.get("/v1/models", models), web.get("/health", live), web.get("/health/ready", readiness)])
    return app


class FrontEnd:
    """The front end's thread and event loop; `start` returns once its port is bound (or raises why not)."""

    def __init__(self, app: web.Application, flags: FrontEndFlags):
        self._app, self._flags = app, flags
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai", daemon=True)

    def start(self) -> "FrontEnd":
        self._thread.start()
        bind = self._flags.bind_address.strip("[]")
        asyncio.run_coroutine_threadsafe(self._bind(bind), self._loop).result(timeout=30)
        LOGGER.info("OpenAI-compatible API on %s:%d (/v1/completions, /v1/models, /health)%s", bind,
                    self._flags.port, "; it requires the API key" if self._flags.api_key else "")
        return self

    async def _bind(self, host: str) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, host, self._flags.port).start()

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=STOP_WAIT_S)
        except Exception as error:  # stopping anyway: the process is ending
            LOGGER.warning("the OpenAI front end did not stop cleanly: %s", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_WAIT_S)
        LOGGER.info("OpenAI front end stopped")


class OpenAIFlags(Protocol):
    """The flags the front end reads (server.ServerConfig has them)."""

    bind_address: str
    openai_port: int
    max_batch_size: int
    model_name: str
    served_model_name: str | None
    api_key: str | None


def start(config: OpenAIFlags, scheduler: engine.Scheduler, parser: RequestParser, max_positions: int) -> FrontEnd | None:
    """The front end over `scheduler`, serving once this returns; None with --openai-port 0. Ready while
    the scheduler takes requests (not draining, not failed)."""
    if not config.openai_port:
        return None
    names = tuple(dict.fromkeys(n for n in (config.model_name, config.served_model_name) if n))
    flags = FrontEndFlags(config.bind_address, config.openai_port, names, config.api_key, max_positions,
                          config.max_batch_size)
    return FrontEnd(make_app(scheduler, parser, flags, ready=lambda: scheduler.accepting), flags).start()
