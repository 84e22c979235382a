"""A catalogue of bad requests through a real server, one case each: what is sent, over which transport,
who refuses it (Triton before our code, or our server) and the exact words of the answer.

After each bad request a good one on the same server must still return the reference text, and one
test sends the whole catalogue at once beside a long stream and good requests. Then the per-request
deadline (`timeout_seconds`, `--request-timeout`), the bounded queue (`--max-queue-size`) and freeing
the slot of a client that disconnects. `markdown_table()` renders the catalogue as the README's table.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import client
import server as server_module
from serving import ServerProcess, metric, running_server, wait_metric

MAX_BATCH_SIZE = 4
SLOTS = 4
TIMEOUT_S = 120  # the most any one call of these tests waits for an answer
REFERENCE_PROMPT, REFERENCE_LENGTH = "The capital of Poland is", 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("bad-input"), cache_dir, "--max-batch-size", str(MAX_BATCH_SIZE),
                        "--decode-slots", str(SLOTS), "--model-instances", "2",
                        "--max-queue-size", str(MAX_BATCH_SIZE)) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------------
# What a request carries, and the transports that send it
# ---------------------------------------------------------------------------------------------------

Tensor = tuple[str, str, np.ndarray]  # Triton input name, Triton datatype, value [B, 1] as that datatype's numpy dtype


def tensor(name: str, datatype: str, *values: Any, shape: Sequence[int] | None = None) -> Tensor:
    """One input; rows of one element each unless `shape` says otherwise."""
    dtype = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64,
             "BOOL": np.bool_}[datatype]
    return name, datatype, np.array(values, dtype=dtype).reshape(shape if shape is not None else (len(values), 1))


def request(prompt: bytes | str = b"Hello", length: int = 4, *settings: Tensor) -> list[Tensor]:
    """A one-row request: the two required inputs plus any optional ones."""
    prompt = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    return [tensor("input", "BYTES", prompt), tensor("output_length", "INT64", length), *settings]


def setting(name: str, value: Any) -> list[Tensor]:
    """A one-row request ("Hello", 4 tokens) with one optional input of the model's own datatype."""
    return request(b"Hello", 4, tensor(name, client.SETTING_DTYPES.get(name, ("FP32",))[0], value))


REFERENCE = request(REFERENCE_PROMPT, REFERENCE_LENGTH)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What came back: a status as the transport reports it, the error message, or the generated text."""

    status: str  # "ok", an HTTP code ("400"), a gRPC code ("StatusCode.INVALID_ARGUMENT"); "None" for a stream error
    message: str = ""
    text: str | None = None


def unary_answer(connection: Any, infer: Callable[[], Any]) -> Answer:
    """The answer of one unary infer on `connection`, which it closes: the text, or Triton's status and error."""
    try:
        result = infer()
    except InferenceServerException as error:
        return Answer(str(error.status()), error.message())
    finally:
        connection.close()
    return Answer("ok", text=result.as_numpy("output").reshape(-1)[0].decode("utf-8"))


def send_http(srv: ServerProcess, model: str, inputs: Sequence[Tensor]) -> Answer:
    """tritonclient.http infer (binary tensors)."""
    connection = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}", network_timeout=TIMEOUT_S)
    return unary_answer(connection, lambda: connection.infer(model, client.triton_tensors(httpclient, inputs)))


def send_grpc(srv: ServerProcess, model: str, inputs: Sequence[Tensor]) -> Answer:
    """tritonclient.grpc infer (unary ModelInfer)."""
    connection = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    return unary_answer(connection, lambda: connection.infer(
        model, client.triton_tensors(grpcclient, inputs), client_timeout=TIMEOUT_S))


def send_grpc_stream(srv: ServerProcess, model: str, inputs: Sequence[Tensor]) -> Answer:
    """One request on a gRPC bidirectional stream (ModelStreamInfer); the pieces until the final response."""
    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    connection = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    connection.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        connection.async_stream_infer(model, client.triton_tensors(grpcclient, inputs),
                                      enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = events.get(timeout=TIMEOUT_S)
            if error is not None:
                return Answer(str(error.status()), error.message())
            pieces.append(client.response_piece(result))
            if client.is_final_response(result):
                return Answer("ok", text="".join(pieces))
    finally:
        connection.stop_stream()
        connection.close()


def _json_value(array: np.ndarray) -> list[Any]:
    return [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]


def _post(srv: ServerProcess, path: str, body: Any) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    call = urllib.request.Request(f"{srv.http_url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def send_http_json(srv: ServerProcess, model: str, inputs: Sequence[Tensor] | dict | bytes) -> Answer:
    """Triton's JSON infer endpoint by hand, for what tritonclient will not build (a dict or bytes: sent as is)."""
    body = inputs if isinstance(inputs, (dict, bytes)) else {"inputs": [
        {"name": n, "datatype": d, "shape": list(a.shape), "data": _json_value(a)} for n, d, a in inputs]}
    status, raw = _post(srv, f"/v2/models/{model}/infer", body)
    answer = json.loads(raw)
    if "error" in answer:
        return Answer(str(status), answer["error"])
    return Answer("ok", text=answer["outputs"][0]["data"][0])


def _generate_body(inputs: Sequence[Tensor] | dict) -> dict:
    """The generate endpoints' JSON: one key per input, one value each (one row)."""
    return inputs if isinstance(inputs, dict) else {n: _json_value(a)[0] for n, _, a in inputs}


def _events(raw: bytes) -> list[dict]:
    """A generate_stream answer: one JSON body when refused before the model, else server-sent events."""
    try:
        return [json.loads(raw)]
    except ValueError:
        return [json.loads(data) for data in client.sse_data(raw.splitlines(keepends=True))]


def send_http_sse(srv: ServerProcess, model: str, inputs: Sequence[Tensor] | dict) -> Answer:
    """Triton's HTTP generate_stream endpoint (server-sent events)."""
    status, raw = _post(srv, f"/v2/models/{model}/generate_stream", _generate_body(inputs))
    events = _events(raw)
    errors = [event["error"] for event in events if "error" in event]
    if errors:
        return Answer(str(status), errors[0])
    return Answer("ok" if status == 200 else str(status), text="".join(str(e.get("output", "")) for e in events))


def send_http_generate(srv: ServerProcess, model: str, inputs: Sequence[Tensor] | dict) -> Answer:
    """Triton's HTTP generate endpoint (one JSON answer)."""
    status, raw = _post(srv, f"/v2/models/{model}/generate", _generate_body(inputs))
    answer = json.loads(raw)
    if "error" in answer:
        return Answer(str(status), answer["error"])
    return Answer("ok" if status == 200 else str(status), text=answer["output"])


TRANSPORTS: dict[str, Callable[[ServerProcess, str, Any], Answer]] = {
    "http": send_http, "grpc": send_grpc, "http-json": send_http_json, "grpc-stream": send_grpc_stream,
    "http-sse": send_http_sse, "http-generate": send_http_generate,
}
DEFAULT_MODEL = {"http": "OPT", "grpc": "OPT", "http-json": "OPT", "grpc-stream": "OPT_stream",
                 "http-sse": "OPT_stream", "http-generate": "OPT_stream"}
PROTOCOL = {"http": "http", "http-json": "http", "http-sse": "http", "http-generate": "http", "grpc": "grpc",
            "grpc-stream": "grpc"}

# The status each refuser gives on each transport. Our stub model (stub_model.py) answers a bad parameter
# of ours with Triton's INVALID_ARG, its message the exception's text alone: HTTP 400, gRPC
# INVALID_ARGUMENT. A stream's error event carries no status at all, and generate_stream gives every error
# in its first response 400, whatever its code.
TRITON, OURS, SERVED = "Triton", "our server", "served"
STATUS = {
    (TRITON, "http"): "400", (TRITON, "http-json"): "400", (TRITON, "http-sse"): "400",
    (TRITON, "grpc"): "StatusCode.INVALID_ARGUMENT", (TRITON, "grpc-stream"): "None",
    (OURS, "http"): "400", (OURS, "http-json"): "400", (OURS, "grpc"): "StatusCode.INVALID_ARGUMENT",
    (OURS, "grpc-stream"): "None", (OURS, "http-sse"): "400",
}


# ---------------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad request. `message`: the whole error when our server refuses it, an exact substring of
    Triton's; for `SERVED` cases the request is served and must give the reference text. `status`: per
    transport, where it differs from STATUS."""

    name: str
    what: str
    inputs: Any
    via: tuple[str, ...]
    refused_by: str
    message: str = ""
    model: str | None = None  # None: the transport's default (OPT, or OPT_stream for the stream transports)
    status: dict[str, str] = dataclasses.field(default_factory=dict)

    def model_for(self, transport: str) -> str:
        return self.model or DEFAULT_MODEL[transport]

    def status_for(self, transport: str) -> str:
        if self.refused_by == SERVED:
            return "ok"
        return self.status.get(transport) or STATUS[(self.refused_by, transport)]


BOTH = ("http", "grpc")
BOTH_JSON = ("http-json", "grpc")  # tritonclient would build these too; the JSON shows Triton's own words
ALL = ("http", "grpc", "grpc-stream", "http-sse")
OUTPUT_LENGTH = tensor("output_length", "INT64", 4)
HELLO = tensor("input", "BYTES", b"Hello")
TYPE = "data-type is '{}', but model 'OPT' expects '{}'"
LONG_PROMPT = " hello" * 2100  # 2101 tokens with BOS
FILLING_PROMPT = " hello" * 2040  # 2041 tokens: fits, but not with 16 more

CATALOGUE = [
    # -- the inputs, their datatypes and shapes: Triton refuses them before our code runs ------------
    Case("missing-output-length", "no `output_length`", [HELLO], BOTH_JSON, TRITON,
         "missing required input(s) ['output_length']"),
    Case("missing-input", "no `input`", [OUTPUT_LENGTH], BOTH_JSON, TRITON, "missing required input(s) ['input']"),
    Case("no-inputs", "no inputs at all", [], BOTH_JSON, TRITON, "missing required input(s) ['input','output_length']"),
    Case("misspelt-input", "an input the model does not have (`temprature`)",
         [HELLO, OUTPUT_LENGTH, tensor("temprature", "FP32", 0.5)], BOTH_JSON, TRITON,
         "unexpected inference input 'temprature' for model 'OPT'"),
    Case("input-as-int64", "`input` as INT64", [tensor("input", "INT64", 5), OUTPUT_LENGTH], BOTH_JSON, TRITON,
         "inference input 'input' " + TYPE.format("INT64", "BYTES")),
    Case("output-length-as-fp32", "`output_length` as FP32", [HELLO, tensor("output_length", "FP32", 4.0)],
         BOTH_JSON, TRITON, "inference input 'output_length' " + TYPE.format("FP32", "INT64")),
    Case("output-length-as-int32", "`output_length` as INT32", [HELLO, tensor("output_length", "INT32", 4)],
         BOTH_JSON, TRITON, "inference input 'output_length' " + TYPE.format("INT32", "INT64")),
    Case("temperature-as-int64", "`temperature` as INT64", request(b"Hello", 4, tensor("temperature", "INT64", 1)),
         BOTH_JSON, TRITON, "inference input 'temperature' " + TYPE.format("INT64", "FP32")),
    Case("temperature-as-fp64", "`temperature` as FP64", request(b"Hello", 4, tensor("temperature", "FP64", 1.0)),
         BOTH_JSON, TRITON, "inference input 'temperature' " + TYPE.format("FP64", "FP32")),
    Case("top-k-as-int64", "`top_k` as INT64", request(b"Hello", 4, tensor("top_k", "INT64", 5)), BOTH_JSON, TRITON,
         "inference input 'top_k' " + TYPE.format("INT64", "INT32")),
    Case("seed-as-int32", "`seed` as INT32", request(b"Hello", 4, tensor("seed", "INT32", 5)), BOTH_JSON, TRITON,
         "inference input 'seed' " + TYPE.format("INT32", "INT64")),
    Case("ignore-eos-as-int32", "`ignore_eos` as INT32", request(b"Hello", 4, tensor("ignore_eos", "INT32", 1)),
         BOTH_JSON, TRITON, "inference input 'ignore_eos' " + TYPE.format("INT32", "BOOL")),
    Case("no-batch-dimension", "`output_length` of shape [1] (no batch dimension)",
         [HELLO, tensor("output_length", "INT64", 4, shape=(1,))], BOTH_JSON, TRITON,
         "unexpected shape for input 'output_length' for model 'OPT'. Expected [-1,1], got [1]"),
    Case("two-columns", "`input` of shape [1, 2]", [tensor("input", "BYTES", b"a", b"b", shape=(1, 2)), OUTPUT_LENGTH],
         BOTH_JSON, TRITON, "unexpected shape for input 'input' for model 'OPT'. Expected [-1,1], got [1,2]"),
    Case("rows-differ", "2 prompts but 1 `output_length`", [tensor("input", "BYTES", b"a", b"b"), OUTPUT_LENGTH],
         BOTH_JSON, TRITON, "batch size does not match other inputs for 'OPT'"),
    Case("setting-rows-differ", "1 prompt but 2 `temperature` rows",
         request(b"Hello", 4, tensor("temperature", "FP32", 1.0, 1.0)), BOTH_JSON, TRITON,
         "batch size does not match other inputs for 'OPT'"),
    Case("empty-batch", "an empty batch (shape [0, 1])",
         [tensor("input", "BYTES", shape=(0, 1)), tensor("output_length", "INT64", shape=(0, 1))], BOTH_JSON, TRITON,
         "input byte size mismatch for input 'output_length' for model 'OPT'. Expected 8, got 0"),
    Case("batch-over-max", f"{MAX_BATCH_SIZE + 1} rows (over `--max-batch-size {MAX_BATCH_SIZE}`)",
         [tensor("input", "BYTES", *[b"a"] * (MAX_BATCH_SIZE + 1)),
          tensor("output_length", "INT64", *[2] * (MAX_BATCH_SIZE + 1))], BOTH, TRITON,
         f"inference request batch-size must be <= {MAX_BATCH_SIZE} for 'OPT'"),
    Case("two-rows-to-stream", "2 rows to `OPT_stream`", [tensor("input", "BYTES", b"a", b"b"),
                                                         tensor("output_length", "INT64", 2, 2)],
         ("grpc-stream",), TRITON, "inference request batch-size must be <= 1 for 'OPT_stream'"),
    Case("unknown-model", "a model that does not exist (`OPT_nope`)", REFERENCE, BOTH_JSON, TRITON,
         "Request for unknown model: 'OPT_nope' is not found", model="OPT_nope",
         status={"http-json": "404", "grpc": "StatusCode.NOT_FOUND"}),
    # -- JSON that Triton cannot read ------------------------------------------------------------------
    Case("json-data-count", "JSON: shape [1, 1] with two prompts in `data`",
         {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1], "data": ["a", "b"]},
                     {"name": "output_length", "datatype": "INT64", "shape": [1, 1], "data": [4]}]},
         ("http-json",), TRITON, "unexpected number of string elements 2 for inference input 'input' for model "
                                 "'OPT', expecting 1"),
    Case("json-float-length", "JSON: `output_length` data 4.5",
         {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1], "data": ["Hello"]},
                     {"name": "output_length", "datatype": "INT64", "shape": [1, 1], "data": [4.5]}]},
         ("http-json",), TRITON, "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer",
         status={"http-json": "500"}),
    Case("json-number-prompt", "JSON: `input` data 5 (not a string)",
         {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1], "data": [5]},
                     {"name": "output_length", "datatype": "INT64", "shape": [1, 1], "data": [4]}]},
         ("http-json",), TRITON, "Unable to parse JSON bytes array: attempt to access JSON non-string as string",
         status={"http-json": "500"}),
    Case("not-json", "a body that is not JSON", b"{not json", ("http-json",), TRITON,
         "failed to parse the request JSON buffer", status={"http-json": "500"}),
    Case("generate-string-length", "generate_stream JSON: `output_length` \"4\" (a string)",
         {"input": "Hello", "output_length": "4"}, ("http-sse",), TRITON,
         "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer",
         status={"http-sse": "500"}),
    # -- values our server refuses ------------------------------------------------------------------------
    Case("empty-prompt", "an empty prompt", request(b""), ALL, OURS, "row 0: input is empty"),
    Case("empty-second-row", "a good prompt and an empty one",
         [tensor("input", "BYTES", b"fine", b""), tensor("output_length", "INT64", 4, 4)], BOTH, OURS,
         "row 1: input is empty"),
    Case("not-utf8", "prompt bytes `ff fe` (not UTF-8)", request(b"\xff\xfe"), ("http", "grpc", "grpc-stream"), OURS,
         "row 0: input is not valid UTF-8 ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    Case("prompt-too-long", "a prompt of 2101 tokens", request(LONG_PROMPT, 4), ALL, OURS,
         "row 0: prompt of 2101 tokens plus output_length 4 exceeds the model's 2048 positions"),
    Case("prompt-plus-output-too-long", "a prompt of 2041 tokens and `output_length` 16",
         request(FILLING_PROMPT, 16), ALL, OURS,
         "row 0: prompt of 2041 tokens plus output_length 16 exceeds the model's 2048 positions"),
    Case("output-length-zero", "`output_length` 0", request(b"Hello", 0), ALL, OURS,
         "row 0: output_length must be at least 1, got 0"),
    Case("output-length-negative", "`output_length` -1", request(b"Hello", -1), ALL, OURS,
         "row 0: output_length must be at least 1, got -1"),
    Case("output-length-1e9", "`output_length` 10^9", request(b"Hello", 10**9), ALL, OURS,
         "row 0: prompt of 2 tokens plus output_length 1000000000 exceeds the model's 2048 positions"),
    Case("output-length-2^62", "`output_length` 2^62", request(b"Hello", 2**62), BOTH, OURS,
         f"row 0: prompt of 2 tokens plus output_length {2**62} exceeds the model's 2048 positions"),
    Case("output-length-int64-max", "`output_length` 2^63 - 1", request(b"Hello", 2**63 - 1), BOTH, OURS,
         f"row 0: prompt of 2 tokens plus output_length {2**63 - 1} exceeds the model's 2048 positions"),
    Case("temperature-negative", "`temperature` -1", setting("temperature", -1.0), ALL, OURS,
         "row 0: temperature -1.0 must be >= 0 and <= 100"),
    Case("temperature-nan", "`temperature` NaN", setting("temperature", np.nan), BOTH, OURS,
         "row 0: temperature nan must be >= 0 and <= 100"),
    Case("temperature-inf", "`temperature` +inf", setting("temperature", np.inf), BOTH, OURS,
         "row 0: temperature inf must be >= 0 and <= 100"),
    Case("temperature-over-max", "`temperature` 100.5", setting("temperature", 100.5), BOTH, OURS,
         "row 0: temperature 100.5 must be >= 0 and <= 100"),
    Case("top-k-negative", "`top_k` -1", setting("top_k", -1), ALL, OURS,
         "row 0: top_k -1 must be >= 0 and <= 50272 (0: off)"),
    Case("top-k-over-vocab", "`top_k` 50273 (over the vocabulary)", setting("top_k", 50273), BOTH, OURS,
         "row 0: top_k 50273 must be >= 0 and <= 50272 (0: off)"),
    Case("top-p-zero", "`top_p` 0", setting("top_p", 0.0), ALL, OURS, "row 0: top_p 0.0 must be > 0 and <= 1"),
    Case("top-p-over-one", "`top_p` 1.5", setting("top_p", 1.5), BOTH, OURS, "row 0: top_p 1.5 must be > 0 and <= 1"),
    Case("top-p-nan", "`top_p` NaN", setting("top_p", np.nan), BOTH, OURS, "row 0: top_p nan must be > 0 and <= 1"),
    Case("seed-negative", "`seed` -1", setting("seed", -1), ALL, OURS, "row 0: seed -1 must be >= 0"),
    *(Case(f"timeout-seconds-{label}", f"`timeout_seconds` {label}", setting("timeout_seconds", value), BOTH, OURS,
           f"row 0: timeout_seconds {value!r} must be > 0 and <= 86400")
      for label, value in (("zero", 0.0), ("negative", -1.0), ("nan", float("nan")), ("inf", float("inf")))),
    Case("timeout-seconds-as-fp64", "`timeout_seconds` as FP64",
         request(b"Hello", 4, tensor("timeout_seconds", "FP64", 1.0)), BOTH_JSON, TRITON,
         "inference input 'timeout_seconds' " + TYPE.format("FP64", "FP32")),
    # -- a streaming request to the non-streaming model, and the reverse -------------------------------
    Case("stream-to-opt", "a gRPC stream request (or HTTP generate_stream) to `OPT`", REFERENCE,
         ("grpc-stream", "http-sse"), SERVED, model="OPT"),
    Case("infer-to-opt-stream", "a plain infer request to `OPT_stream`", REFERENCE, BOTH, TRITON,
         "doesn't support models with decoupled transaction policy", model="OPT_stream",
         status={"http": "501", "grpc": "StatusCode.UNIMPLEMENTED"}),
    Case("generate-to-opt-stream", "HTTP generate (not generate_stream) to `OPT_stream`", REFERENCE,
         ("http-generate",), TRITON, "generate expects model to produce exactly 1 response, use generate stream for "
                                     "model that generates various number of responses",
         status={"http-generate": "200"}),
    Case("generate-misspelt-key", "generate_stream JSON with a misspelt key (`temprature`): ignored, not refused",
         {"input": REFERENCE_PROMPT, "output_length": REFERENCE_LENGTH, "temprature": 5.0}, ("http-sse",), SERVED,
         model="OPT"),
]


def catalogue_params() -> list[Any]:
    params = []
    for case in CATALOGUE:
        for transport in case.via:
            params.append(pytest.param(case, transport, id=f"{case.name}-{transport}"))
    return params


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(server: ServerProcess) -> str:
    """The text of the good request, taken before any bad one was sent; both protocols agree on it."""
    over_http, over_grpc = send_http(server, "OPT", REFERENCE), send_grpc(server, "OPT", REFERENCE)
    assert over_http.status == "ok" and over_http == over_grpc, (over_http, over_grpc)
    assert over_http.text.startswith(REFERENCE_PROMPT)
    return over_http.text


def check(case: Case, transport: str, answer: Answer, reference: str) -> None:
    """The answer is the one the catalogue gives: its status and message, or the reference text when served."""
    if case.refused_by == SERVED:
        # OPT answers the prompt plus the text; a stream of OPT_stream would carry the generated part only.
        assert answer == Answer("ok", text=reference), answer
        return
    if case.refused_by == OURS:
        assert answer.message == case.message, answer
    else:
        assert case.message in answer.message, f"{case.message!r} not in {answer.message!r}"
    assert answer.status == case.status_for(transport), answer


def good_request(srv: ServerProcess, protocol: str) -> str | None:
    return (send_grpc if protocol == "grpc" else send_http)(srv, "OPT", REFERENCE).text


@pytest.mark.parametrize("case, transport", catalogue_params())
def test_bad_request_gets_its_message_and_the_server_keeps_serving(server: ServerProcess, reference: str,
                                                                   case: Case, transport: str):
    answer = TRANSPORTS[transport](server, case.model_for(transport), case.inputs)
    check(case, transport, answer, reference)
    assert good_request(server, PROTOCOL[transport]) == reference


def test_a_long_stream_and_good_requests_are_served_while_the_catalogue_fails_beside_them(server: ServerProcess,
                                                                                          reference: str):
    long_request = request("A long story:", 600, tensor("ignore_eos", "BOOL", True))
    expected = send_http(server, "OPT", long_request).text
    assert expected is not None
    stream: dict[str, Any] = {}

    def long_stream() -> None:
        stream["answer"] = send_grpc_stream(server, "OPT_stream", long_request)
        stream["ended"] = time.monotonic()

    runner = threading.Thread(target=long_stream)
    runner.start()
    deadline = time.monotonic() + 30
    while metric(server, "opt_busy_slots") < 1:  # the stream is in its slot before the flood
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.05)
    cases = [(c, t) for c in CATALOGUE for t in c.via]
    first_refusal = []
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        def bad(case: Case, transport: str) -> Answer:
            answer = TRANSPORTS[transport](server, case.model_for(transport), case.inputs)
            first_refusal.append(time.monotonic())
            return answer

        refusals = [pool.submit(bad, c, t) for c, t in cases]
        goods = [pool.submit(good_request, server, protocol) for protocol in ("http", "grpc") * 4]
        for (case, transport), future in zip(cases, refusals):
            check(case, transport, future.result(), reference)
        assert [future.result() for future in goods] == [reference] * len(goods)
    runner.join(timeout=TIMEOUT_S)
    assert stream["answer"] == Answer("ok", text=expected[len("A long story:"):]), stream["answer"]
    assert min(first_refusal) < stream["ended"], "the stream ended before any bad request was answered"


# ---------------------------------------------------------------------------------------------------
# Deadlines, a full queue, a client that goes away
# ---------------------------------------------------------------------------------------------------


LONG = 1900  # tokens: a stream of this many runs for many seconds on the CPU


def long_request(*settings: Tensor) -> list[Tensor]:
    return request("A long story:", LONG, tensor("ignore_eos", "BOOL", True), *settings)


TIMED_OUT = re.compile(rf"timed out: the request's deadline of 1 s passed after \d+ of {LONG} tokens")
TIMED_OUT_STATUS = {"http": "500", "grpc": "StatusCode.INTERNAL", "grpc-stream": "None"}  # no DEADLINE_EXCEEDED in 2.51


@pytest.mark.parametrize("transport", ["http", "grpc", "grpc-stream"])
def test_a_request_past_its_timeout_seconds_fails_with_timed_out_and_frees_its_slot(server: ServerProcess,
                                                                                    reference: str, transport: str):
    wait_metric(server, "opt_busy_slots", 0, 60, why="an earlier test left a row running")
    began = time.monotonic()
    answer = TRANSPORTS[transport](server, DEFAULT_MODEL[transport],
                                   long_request(tensor("timeout_seconds", "FP32", 1.0)))
    assert TIMED_OUT.fullmatch(answer.message) and answer.status == TIMED_OUT_STATUS[transport], answer
    assert time.monotonic() - began < 10
    wait_metric(server, "opt_busy_slots", 0, 3)
    assert good_request(server, PROTOCOL[transport]) == reference


def test_request_timeout_flag_is_refused_when_negative_or_not_finite(capsys: pytest.CaptureFixture[str]):
    for value in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            server_module.parse_args(["--request-timeout", value])
        assert "--request-timeout must be >= 0 seconds" in capsys.readouterr().err


class Streams:
    """gRPC streams of `length` tokens held open until `cancel` (which stops each, cancelling its request)."""

    def __init__(self, srv: ServerProcess, count: int, length: int):
        self.connections = []
        for _ in range(count):
            connection = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
            connection.start_stream(callback=lambda result, error: None)
            inputs = request("A long story:", length, tensor("ignore_eos", "BOOL", True))
            connection.async_stream_infer("OPT_stream", client.triton_tensors(grpcclient, inputs))
            self.connections.append(connection)

    def cancel(self) -> None:
        while self.connections:
            connection = self.connections.pop()
            connection.stop_stream(cancel_requests=True)
            connection.close()


OVERLOADED = (f"overloaded: {MAX_BATCH_SIZE} rows already wait for a decode slot and the queue holds {MAX_BATCH_SIZE} "
              "(--max-queue-size); retry later")
OVERLOADED_STATUS = {"http": "503", "grpc": "StatusCode.UNAVAILABLE", "grpc-stream": "None", "http-sse": "400"}


def test_a_full_queue_refuses_at_once_with_overloaded_and_serves_again_once_it_drains(server: ServerProcess,
                                                                                      reference: str):
    wait_metric(server, "opt_busy_slots", 0, 60, why="an earlier test left a row running")
    # Every slot busy. 800 tokens outlast the checks below (about 1 s); once the streams are cancelled the queue
    # drains at once.
    streams = Streams(server, SLOTS, 800)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            deadline = time.monotonic() + 30
            while metric(server, "opt_busy_slots") < SLOTS:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            rows = [tensor("input", "BYTES", *[b"queued"] * MAX_BATCH_SIZE),
                    tensor("output_length", "INT64", *[3] * MAX_BATCH_SIZE)]
            queued = pool.submit(send_http, server, "OPT", rows)  # fills the queue: --max-queue-size rows
            while metric(server, "opt_queue_length") < MAX_BATCH_SIZE:
                assert time.monotonic() < deadline and not queued.done(), queued
                time.sleep(0.05)
            for transport in ALL:
                began = time.monotonic()
                answer = TRANSPORTS[transport](server, DEFAULT_MODEL[transport], REFERENCE)
                assert answer == Answer(OVERLOADED_STATUS[transport], OVERLOADED), (transport, answer)
                assert time.monotonic() - began < 5, "refused only after waiting"
            streams.cancel()
            assert queued.result().status == "ok"
    finally:
        streams.cancel()
    wait_metric(server, "opt_busy_slots", 0, 10)
    assert good_request(server, "http") == reference


def test_a_grpc_client_that_stops_its_stream_frees_its_slot(server: ServerProcess, reference: str):
    wait_metric(server, "opt_busy_slots", 0, 60, why="an earlier test left a row running")
    pieces: queue.Queue[Any] = queue.Queue()
    connection = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    connection.start_stream(callback=lambda result, error: pieces.put((result, error)))
    connection.async_stream_infer("OPT_stream", client.triton_tensors(grpcclient, long_request()))
    for _ in range(10):  # generating
        result, error = pieces.get(timeout=TIMEOUT_S)
        assert error is None, error
    assert metric(server, "opt_busy_slots") == 1
    connection.stop_stream(cancel_requests=True)
    connection.close()
    wait_metric(server, "opt_busy_slots", 0, 5, why="the slot of a cancelled stream is still busy")
    assert good_request(server, "grpc") == reference


def test_an_http_client_that_closes_its_generate_stream_frees_its_slot(server: ServerProcess, reference: str):
    wait_metric(server, "opt_busy_slots", 0, 60, why="an earlier test left a row running")
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=TIMEOUT_S)
    connection.request("POST", "/v2/models/OPT_stream/generate_stream",
                       body=json.dumps({"input": "A long story:", "output_length": LONG, "ignore_eos": True}))
    response = connection.getresponse()
    for _ in range(10):  # generating: each event is a data line and a blank line
        assert response.readline()
    assert metric(server, "opt_busy_slots") == 1
    connection.sock.close()
    connection.close()
    wait_metric(server, "opt_busy_slots", 0, 5, why="the slot of a closed generate_stream is still busy")
    assert good_request(server, "http") == reference


# ---------------------------------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------------------------------

STATUS_WORDS = {"http": "HTTP", "http-json": "HTTP (JSON)", "grpc": "gRPC", "grpc-stream": "gRPC stream",
                "http-sse": "generate_stream", "http-generate": "generate"}


# The rows that are tests of their own rather than catalogue cases.
OTHER_ROWS = [
    (f"a request of {LONG} tokens with `timeout_seconds` 1 (HTTP, gRPC, gRPC stream)",
     "HTTP 500, gRPC INTERNAL, gRPC stream error event (our server); its slot is freed",
     f"`timed out: the request's deadline of 1 s passed after N of {LONG} tokens`",
     "test_a_request_past_its_timeout_seconds_fails_with_timed_out_and_frees_its_slot"),
    ("`--request-timeout` -1, nan or inf", "the server does not start",
     "`--request-timeout must be >= 0 seconds`", "test_request_timeout_flag_is_refused_when_negative_or_not_finite"),
    (f"a request while {SLOTS} slots are busy and `--max-queue-size {MAX_BATCH_SIZE}` rows wait (all four transports)",
     "HTTP 503, gRPC UNAVAILABLE, gRPC stream error event, generate_stream 400 (our server), at once",
     f"`{OVERLOADED}`",
     "test_a_full_queue_refuses_at_once_with_overloaded_and_serves_again_once_it_drains"),
    ("a gRPC client that stops its 1900-token stream (`stop_stream(cancel_requests=True)`)",
     "(nothing to answer)", "its slot is free within 5 s (`opt_busy_slots` 0)",
     "test_a_grpc_client_that_stops_its_stream_frees_its_slot"),
    ("an HTTP client that closes its 1900-token generate_stream", "(nothing to answer)",
     "its slot is free within 5 s (`opt_busy_slots` 0)",
     "test_an_http_client_that_closes_its_generate_stream_frees_its_slot"),
    ("every catalogue case, all at once, beside a 600-token stream and good requests", "as above",
     "as above; the stream and the good requests give their usual text",
     "test_a_long_stream_and_good_requests_are_served_while_the_catalogue_fails_beside_them"),
]


def markdown_table() -> str:
    """The catalogue as the README's table: what is sent | status and who refuses it | message | test."""
    test = "test_bad_request_gets_its_message_and_the_server_keeps_serving"
    lines = ["| what is sent | status (who refuses it) | the message (ours: all of it; Triton's: an exact substring) "
             "| test |",
             "| --- | --- | --- | --- |"]
    for case in CATALOGUE:
        statuses = ", ".join(f"{STATUS_WORDS[t]} {case.status_for(t).replace('StatusCode.', '')}" for t in case.via)
        statuses = statuses.replace("stream None", "stream error event")
        who = "served: the same text as the plain request" if case.refused_by == SERVED else case.refused_by
        message = f"`{case.message}`" if case.message else "(none)"
        lines.append(f"| {case.what} | {statuses} ({who}) | {message} | `{test}[{case.name}-*]` |")
    for what, status, message, name in OTHER_ROWS:
        lines.append(f"| {what} | {status} | {message} | `{name}` |")
    return "\n".join(lines) + "\n"
