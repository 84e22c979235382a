#!/usr/bin/env python3
"""Sends a prompt to the Triton model `OPT` and prints the prompt followed by the generated text.

    python client.py --server-url http://localhost:8000 --input "The capital of Poland is" --output-length 16
    python client.py --server-url grpc://localhost:8001 --input "Once upon a time" --output-length 32 --stream

The URL's scheme picks the protocol: http:// (port 8000 by default) or grpc:// (port 8001).

--temperature, --top-k, --top-p, --seed and --ignore-eos are each sent as the model's optional input of
that name only when given; a request that sends none gets the server's default (greedy). The client
does not check their ranges: the server is the one authority on what it accepts and says why not.

--stream asks the decoupled model `OPT_stream` instead and prints each piece of text as it arrives:
over grpc:// through Triton's bidirectional gRPC stream, over http:// through Triton's
generate_stream endpoint (server-sent events).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import queue
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterable, Iterator, Sequence, TextIO
from urllib.parse import urlparse

import numpy as np

from protocol import MODEL_NAME, OPTIONAL_INPUTS, STREAM_MODEL_NAME, OptionalInput, Settings

LOGGER = logging.getLogger("client")
Sampling = Settings  # the model's optional inputs, as the benchmarks and tests name them

# Each optional input's Triton datatype and the numpy dtype that carries it.
SETTING_DTYPES: dict[str, tuple[str, Any]] = {o.name: (o.triton_dtype, o.dtype) for o in OPTIONAL_INPUTS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default="http://localhost:8000", help="http://host:port or grpc://host:port")
    parser.add_argument("--input", default="The capital of Poland is", help="the prompt")
    parser.add_argument("--output-length", type=int, default=16, help="how many tokens to generate")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server and the answer")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    for option in OPTIONAL_INPUTS:  # each sent only when given
        if option.dtype is np.bool_:
            parser.add_argument(option.client_flag, action="store_true", default=None, help=option.help)
        else:
            kind = float if np.issubdtype(option.dtype, np.floating) else int
            parser.add_argument(option.client_flag, type=kind, default=None, help=option.help)
    parser.add_argument("--stream", action="store_true",
                        help=f"use the streaming model {STREAM_MODEL_NAME!r} and print text as it arrives")
    return parser.parse_args(argv)


def _dest(option: OptionalInput) -> str:
    return option.client_flag.removeprefix("--").replace("-", "_")


def sampling_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{o.name: getattr(args, _dest(o)) for o in OPTIONAL_INPUTS})


def triton_url(server_url: str) -> tuple[str, str]:
    """(protocol, host:port) from http://..., grpc://... or a bare host:port (HTTP)."""
    parsed = urlparse(server_url if "://" in server_url else f"http://{server_url}")
    if parsed.scheme not in ("http", "grpc"):
        raise SystemExit(f"--server-url scheme must be http or grpc, got {parsed.scheme!r}")
    port = parsed.port or (8000 if parsed.scheme == "http" else 8001)
    host = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname  # IPv6 keeps its brackets
    return parsed.scheme, f"{host}:{port}"


def triton_module(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    return triton


def infer(server_url: str, prompts: Sequence[str], output_lengths: Sequence[int], timeout: float,
          *, sampling: Sampling = Sampling()) -> list[str]:
    """One Triton request with one row per prompt; returns the decoded outputs."""
    protocol, address = triton_url(server_url)
    triton = triton_module(protocol)
    inputs = request_inputs(triton, [p.encode("utf-8") for p in prompts], output_lengths, sampling=sampling)
    outputs = [triton.InferRequestedOutput("output")]
    if protocol == "grpc":
        client = triton.InferenceServerClient(address)
        call = lambda: client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=timeout)
    else:
        client = triton.InferenceServerClient(address, connection_timeout=timeout, network_timeout=timeout)
        call = lambda: client.infer(MODEL_NAME, inputs, outputs=outputs)
    try:
        wait_until_ready(client, timeout)
        result = call()
    finally:
        client.close()
    return [row[0].decode("utf-8") for row in result.as_numpy("output")]


def request_inputs(triton: Any, prompts: Sequence[bytes], output_lengths: Sequence[int],
                   *, sampling: Sampling = Sampling()) -> list[Any]:
    """The model's inputs for `tritonclient.http` or `tritonclient.grpc` (the module `triton`): the two
    required ones, then each setting `sampling` gives, the same value on every row."""
    prompt_array = np.array([[p] for p in prompts], dtype=object)  # [B, 1] bytes
    length_array = np.array([[n] for n in output_lengths], dtype=np.int64)  # [B, 1]
    arrays = [("input", "BYTES", prompt_array), ("output_length", "INT64", length_array)]
    for name, value in sampling.given().items():
        datatype, dtype = SETTING_DTYPES[name]
        arrays.append((name, datatype, np.full((len(prompts), 1), value, dtype=dtype)))
    return triton_tensors(triton, arrays)


def triton_tensors(triton: Any, arrays: Sequence[tuple[str, str, np.ndarray]]) -> list[Any]:
    """`triton.InferInput`s of (name, Triton datatype, array), each holding its array as given."""
    inputs = []
    for name, datatype, array in arrays:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def wait_until_ready(client: Any, timeout: float, model_name: str = MODEL_NAME) -> None:
    """Waits for the model to be ready (a server still loading or warming up), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.is_model_ready(model_name):
                return
        except Exception as error:  # not listening yet
            LOGGER.debug("server not ready: %s", error)
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {model_name!r} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def server_error(message: str, verbose: bool) -> str:
    """The problem the server named: PyTriton wraps it in the server's traceback, which --verbose keeps."""
    named = re.findall(r"PyTriton\w*Error: (.+)", message)
    return message if verbose or not named else named[-1]


# ---------------------------------------------------------------------------------------------------
# Streaming over gRPC: one bidirectional stream, one request on it at a time
# ---------------------------------------------------------------------------------------------------


def response_piece(result: Any) -> str:
    """The text one streamed response carries; "" for a flags-only final response."""
    output = result.as_numpy("output")
    if output is None or output.size == 0:
        return ""
    value = output.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def is_final_response(result: Any) -> bool:
    """Whether Triton marked this response as its request's last one (decoupled models)."""
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def pieces_from_events(events: "queue.Queue[tuple[Any, Any]]", timeout: float) -> Iterator[str]:
    """Yields the non-empty pieces of one request's (result, error) stream events until its final
    response; an error event is raised, and so is a TimeoutError when the final response has not come
    `timeout` seconds after the call."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result, error = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no final response from {STREAM_MODEL_NAME!r} after {timeout:.0f} s") from None
        if error is not None:
            raise error
        piece = response_piece(result)
        if piece:
            yield piece
        if is_final_response(result):
            return


class GrpcStream:
    """A gRPC stream to `OPT_stream` that serves one request after another (a client thread's own).

    Errors carry no request id in tritonclient's callback, so after any failed or abandoned request
    the stream is closed and a new one opened: late events of the old request can never be taken
    for the next one's.
    """

    def __init__(self, address: str):
        import tritonclient.grpc as triton

        self._triton = triton
        self._client = triton.InferenceServerClient(address)
        self._events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._open = False

    def wait_until_ready(self, timeout: float) -> None:
        wait_until_ready(self._client, timeout, STREAM_MODEL_NAME)

    def generate(self, prompt: str, output_length: int, timeout: float,
                 sampling: Sampling = Sampling()) -> Iterator[str]:
        """Sends one request; yields its pieces of generated text as they arrive."""
        self._ensure_open()
        inputs = request_inputs(self._triton, [prompt.encode("utf-8")], [output_length], sampling=sampling)
        finished = False
        try:
            self._client.async_stream_infer(STREAM_MODEL_NAME, inputs, enable_empty_final_response=True)
            yield from pieces_from_events(self._events, timeout)
            finished = True
        finally:
            if not finished:
                self._reset()

    def close(self) -> None:
        self._reset()
        self._client.close()

    def _ensure_open(self) -> None:
        if not self._open:
            self._events = queue.Queue()
            events = self._events  # this stream's queue: a later stream gets a new one
            self._client.start_stream(callback=lambda result, error: events.put((result, error)))
            self._open = True

    def _reset(self) -> None:
        if self._open:
            self._client.stop_stream(cancel_requests=True)
            self._open = False


# ---------------------------------------------------------------------------------------------------
# Streaming over HTTP: Triton's generate_stream endpoint (server-sent events)
# ---------------------------------------------------------------------------------------------------


def generate_stream_body(prompt: str, output_length: int, sampling: Sampling) -> bytes:
    """The generate endpoint's JSON: one key per model input, each a single value (one row)."""
    return json.dumps({"input": prompt, "output_length": output_length, **sampling.given()}).encode("utf-8")


def sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """The data of each server-sent event (its `data:` lines joined by newlines), in order."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[len("data:"):]
            data.append(value[1:] if value.startswith(" ") else value)
        # comments (":...") and other fields (event:, id:, retry:) carry nothing we use
    if data:
        yield "\n".join(data)


def event_piece(data: str) -> str:
    """The generated text of one generate_stream event; an error event raises the server's message."""
    from tritonclient.utils import InferenceServerException

    payload = json.loads(data)
    if "error" in payload:
        raise InferenceServerException(msg=str(payload["error"]))
    value = payload.get("output", "")
    while isinstance(value, list):  # a tensor of one element may come back as a (nested) list
        value = value[0] if value else ""
    return str(value)


def http_error_message(body: bytes, status: int) -> str:
    """Triton's {"error": ...} of a refused generate_stream: a JSON body when refused before inference,
    an event of the stream (with the error status already set) when the model raised at once."""
    for candidate in [body.decode("utf-8", "replace"), *sse_data(body.splitlines(keepends=True))]:
        try:
            return str(json.loads(candidate)["error"])
        except (ValueError, KeyError, TypeError):
            continue
    return f"HTTP {status}: {body.decode('utf-8', 'replace')}"


def http_stream(address: str, prompt: str, output_length: int, timeout: float,
                sampling: Sampling = Sampling()) -> Iterator[str]:
    """Yields the pieces of generated text `OPT_stream` sends through generate_stream, as they arrive."""
    from tritonclient.utils import InferenceServerException

    request = urllib.request.Request(
        f"http://{address}/v2/models/{STREAM_MODEL_NAME}/generate_stream",
        data=generate_stream_body(prompt, output_length, sampling),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise InferenceServerException(msg=http_error_message(error.read(), error.code)) from None
    with response:
        for data in sse_data(response):
            piece = event_piece(data)
            if piece:
                yield piece


def stream_pieces(server_url: str, prompt: str, output_length: int, timeout: float,
                  sampling: Sampling = Sampling()) -> Iterator[str]:
    """The pieces of one streamed generation over the protocol the URL names. Waits for the model to be
    ready before it returns, so nothing is printed for a server that never comes."""
    protocol, address = triton_url(server_url)
    if protocol == "grpc":
        stream = GrpcStream(address)
        try:
            stream.wait_until_ready(timeout)
        except BaseException:
            stream.close()
            raise
        return _closing(stream.generate(prompt, output_length, timeout, sampling), stream)
    import tritonclient.http as triton

    client = triton.InferenceServerClient(address, connection_timeout=timeout, network_timeout=timeout)
    try:
        wait_until_ready(client, timeout, STREAM_MODEL_NAME)
    finally:
        client.close()
    return http_stream(address, prompt, output_length, timeout, sampling)


def _closing(pieces: Iterator[str], stream: GrpcStream) -> Iterator[str]:
    try:
        yield from pieces
    finally:
        stream.close()


def print_stream(prompt: str, pieces: Iterable[str], out: TextIO | None = None) -> None:
    """Prints the prompt, then each piece the moment it arrives, and a newline at the end (also on error)."""
    out = out or sys.stdout
    try:
        for text in itertools.chain([prompt], pieces):
            out.write(text)
            out.flush()
    finally:
        out.write("\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tritonclient.utils import InferenceServerException

    sampling = sampling_from_args(args)
    try:
        if args.stream:
            print_stream(args.input, stream_pieces(args.server_url, args.input, args.output_length, args.timeout,
                                                   sampling))
            return 0
        outputs = infer(args.server_url, [args.input], [args.output_length], args.timeout, sampling=sampling)
    except InferenceServerException as error:
        print(f"error: {server_error(error.message() or str(error), args.verbose)}", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as error:  # a timeout, a refused or broken connection
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"output: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
