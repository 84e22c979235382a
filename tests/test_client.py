"""client.py without a Triton server: arguments, the inputs it builds, and how it reads streamed answers.

The streaming paths are fed the way Triton feeds them: gRPC stream events as tritonclient's callback
receives them (real protobuf responses), and server-sent events from a small local HTTP server that
speaks the generate_stream endpoint's format.
"""
from __future__ import annotations

import http.server
import json
import queue
import threading
import types
from typing import Any, Iterator

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import client
from client import Sampling

ALL_SETTINGS = Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=123, ignore_eos=True, timeout_seconds=2.5)


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def test_defaults_send_no_setting_and_do_not_stream():
    args = client.parse_args([])
    assert client.sampling_from_args(args) == Sampling()
    assert Sampling().given() == {}
    assert not args.stream
    assert (args.server_url, args.input, args.output_length, args.timeout) == (
        "http://localhost:8000", "The capital of Poland is", 16, 600.0)


def test_every_setting_flag_is_parsed_with_its_type():
    args = client.parse_args(["--temperature", "0.7", "--top-k", "40", "--top-p", "0.9", "--seed", "123",
                              "--ignore-eos", "--deadline", "2.5", "--stream"])
    assert client.sampling_from_args(args) == ALL_SETTINGS
    assert args.stream


def test_a_zero_setting_counts_as_given():
    args = client.parse_args(["--temperature", "0", "--top-k", "0", "--seed", "0"])
    assert client.sampling_from_args(args).given() == {"temperature": 0.0, "top_k": 0, "seed": 0}


def test_out_of_range_settings_are_left_for_the_server_to_refuse():
    args = client.parse_args(["--temperature", "-1", "--top-p", "0", "--seed", "-3"])
    assert client.sampling_from_args(args).given() == {"temperature": -1.0, "top_p": 0.0, "seed": -3}


@pytest.mark.parametrize("url, expected", [
    ("http://localhost:8000", ("http", "localhost:8000")),
    ("grpc://10.0.0.1", ("grpc", "10.0.0.1:8001")),
    ("example.com:9000", ("http", "example.com:9000")),
    ("http://host", ("http", "host:8000")),
])
def test_server_url_gives_protocol_and_address(url: str, expected: tuple[str, str]):
    assert client.triton_url(url) == expected


def test_unknown_scheme_is_refused():
    with pytest.raises(SystemExit, match="scheme must be http or grpc"):
        client.triton_url("ftp://host:1")


# ---------------------------------------------------------------------------------------------------
# The inputs a request carries
# ---------------------------------------------------------------------------------------------------


class RecordedInput:
    """Stands in for tritonclient's InferInput and keeps the array it was given."""

    def __init__(self, name: str, shape: list[int], datatype: str):
        self.name, self.shape, self.datatype = name, shape, datatype
        self.array: np.ndarray | None = None

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        self.array = array


RECORDING = types.SimpleNamespace(InferInput=RecordedInput)


@pytest.mark.parametrize("module", [tritonclient.http, tritonclient.grpc], ids=["http", "grpc"])
def test_without_settings_only_the_two_required_inputs_are_sent(module: Any):
    inputs = client.request_inputs(module, [b"a", b"bc", b"def"], [1, 2, 3])
    assert [(i.name(), i.datatype(), list(i.shape())) for i in inputs] == [
        ("input", "BYTES", [3, 1]), ("output_length", "INT64", [3, 1])]


@pytest.mark.parametrize("module", [tritonclient.http, tritonclient.grpc], ids=["http", "grpc"])
def test_every_setting_becomes_a_batch_by_one_input_of_its_datatype(module: Any):
    # tritonclient itself checks that each array's dtype matches the declared datatype.
    inputs = client.request_inputs(module, [b"a", b"bc"], [4, 5], sampling=ALL_SETTINGS)
    assert [(i.name(), i.datatype(), list(i.shape())) for i in inputs] == [
        ("input", "BYTES", [2, 1]), ("output_length", "INT64", [2, 1]), ("temperature", "FP32", [2, 1]),
        ("top_k", "INT32", [2, 1]), ("top_p", "FP32", [2, 1]), ("seed", "INT64", [2, 1]),
        ("ignore_eos", "BOOL", [2, 1]), ("timeout_seconds", "FP32", [2, 1])]


def test_settings_are_repeated_on_every_row_with_numpy_dtypes_that_match():
    inputs = {i.name: i for i in client.request_inputs(RECORDING, [b"x", b"y"], [7, 8], sampling=ALL_SETTINGS)}
    expected = {"temperature": (np.float32, 0.7), "top_k": (np.int32, 40), "top_p": (np.float32, 0.9),
                "seed": (np.int64, 123), "ignore_eos": (np.bool_, True), "timeout_seconds": (np.float32, 2.5)}
    for name, (dtype, value) in expected.items():
        array = inputs[name].array
        assert array.dtype == dtype and array.shape == (2, 1), name
        np.testing.assert_array_equal(array, np.full((2, 1), value, dtype=dtype))
    np.testing.assert_array_equal(inputs["input"].array, np.array([[b"x"], [b"y"]], dtype=object))
    np.testing.assert_array_equal(inputs["output_length"].array, np.array([[7], [8]], dtype=np.int64))


@pytest.mark.parametrize("sampling, names", [
    (Sampling(top_p=0.5), ["top_p"]),
    (Sampling(seed=0, ignore_eos=False), ["seed", "ignore_eos"]),
    (Sampling(temperature=0.0), ["temperature"]),
])
def test_only_the_settings_given_are_sent(sampling: Sampling, names: list[str]):
    inputs = client.request_inputs(RECORDING, [b"p"], [1], sampling=sampling)
    assert [i.name for i in inputs] == ["input", "output_length", *names]


def test_request_inputs_keeps_its_positional_signature():
    inputs = client.request_inputs(RECORDING, [b"p"], [3])  # how tests/serving.py calls it
    assert [i.name for i in inputs] == ["input", "output_length"]


# ---------------------------------------------------------------------------------------------------
# main(): printing, errors
# ---------------------------------------------------------------------------------------------------


def test_main_sends_the_settings_given_and_prints_the_output_list(monkeypatch, capsys):
    calls = []

    def fake_infer(url, prompts, lengths, timeout, *, sampling):
        calls.append((url, prompts, lengths, timeout, sampling))
        return [prompts[0] + " and more"]

    monkeypatch.setattr(client, "infer", fake_infer)
    status = client.main(["--server-url", "grpc://h:1", "--input", "Hi", "--output-length", "3", "--seed", "5"])
    assert status == 0
    assert capsys.readouterr().out == "output: ['Hi and more']\n"
    assert calls == [("grpc://h:1", ["Hi"], [3], 600.0, Sampling(seed=5))]


def test_main_prints_the_servers_error_and_exits_1(monkeypatch, capsys):
    def failing_infer(*_args, **_kwargs):
        raise InferenceServerException(msg="Traceback ...\nPyTritonBadParameterError: temperature must be >= 0")

    monkeypatch.setattr(client, "infer", failing_infer)
    assert client.main(["--temperature", "-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: temperature must be >= 0\n"


def test_main_streams_the_prompt_then_each_piece_and_a_newline(monkeypatch, capsys):
    seen = []

    def fake_stream(url, prompt, length, timeout, sampling):
        seen.append((url, prompt, length, sampling))
        return iter([" one", " two", " three"])

    monkeypatch.setattr(client, "stream_pieces", fake_stream)
    assert client.main(["--stream", "--input", "Count:", "--output-length", "3", "--top-k", "2"]) == 0
    assert capsys.readouterr().out == "Count: one two three\n"
    assert seen == [("http://localhost:8000", "Count:", 3, Sampling(top_k=2))]


def test_a_stream_that_fails_midway_ends_its_line_and_reports_the_error(monkeypatch, capsys):
    def failing_stream(*_args):
        yield " partial"
        raise InferenceServerException(msg="lost rank 1: no heartbeat for 10 s")

    monkeypatch.setattr(client, "stream_pieces", failing_stream)
    assert client.main(["--stream", "--input", "Go"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "Go partial\n"
    assert captured.err == "error: lost rank 1: no heartbeat for 10 s\n"


# ---------------------------------------------------------------------------------------------------
# gRPC streaming: Triton's responses as tritonclient's stream callback gets them
# ---------------------------------------------------------------------------------------------------


def grpc_result(piece: str | None, final: bool) -> tritonclient.grpc.InferResult:
    """A decoupled model's response: one BYTES (1, 1) `output` (None: a flags-only response)."""
    response = service_pb2.ModelInferResponse(model_name="OPT_stream")
    if piece is not None:
        response.outputs.add(name="output", datatype="BYTES", shape=[1, 1])
        response.raw_output_contents.append(
            serialize_byte_tensor(np.array([[piece.encode("utf-8")]], dtype=object)).item())
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return tritonclient.grpc.InferResult(response)


def events(*items: tuple[Any, Any]) -> "queue.Queue[tuple[Any, Any]]":
    q: queue.Queue[tuple[Any, Any]] = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_pieces_are_read_until_the_final_flag_and_empty_ones_skipped():
    stream = events((grpc_result("Hel", False), None), (grpc_result("", False), None),
                    (grpc_result("lo ż", False), None), (grpc_result(None, True), None),
                    (grpc_result("never read", False), None))
    assert list(client.pieces_from_events(stream, timeout=1)) == ["Hel", "lo ż"]


def test_a_final_response_may_carry_the_last_piece():
    stream = events((grpc_result("a", False), None), (grpc_result("b", True), None))
    assert list(client.pieces_from_events(stream, timeout=1)) == ["a", "b"]


def test_an_error_event_is_raised():
    stream = events((grpc_result("a", False), None), (None, InferenceServerException(msg="bad top_p")))
    pieces = client.pieces_from_events(stream, timeout=1)
    assert next(pieces) == "a"
    with pytest.raises(InferenceServerException, match="bad top_p"):
        next(pieces)


def test_a_stream_without_a_final_response_times_out():
    with pytest.raises(TimeoutError, match="no final response"):
        list(client.pieces_from_events(events((grpc_result("a", False), None)), timeout=0.2))


class FakeGrpcClient:
    """tritonclient.grpc's client as GrpcStream uses it; each request's events are scripted."""

    def __init__(self, address: str):
        self.address = address
        self.scripts: list[list[tuple[Any, Any]]] = []
        self.calls: list[str] = []
        self.requests: list[list[str]] = []
        self._callback = None

    def start_stream(self, callback: Any) -> None:
        self.calls.append("start")
        self._callback = callback

    def stop_stream(self, cancel_requests: bool = False) -> None:
        self.calls.append(f"stop(cancel={cancel_requests})")

    def async_stream_infer(self, model_name: str, inputs: list[Any], enable_empty_final_response: bool) -> None:
        assert model_name == "OPT_stream" and enable_empty_final_response
        self.requests.append([i.name() for i in inputs])
        for result, error in self.scripts.pop(0):
            self._callback(result=result, error=error)

    def close(self) -> None:
        self.calls.append("close")


def test_one_stream_serves_requests_back_to_back_and_is_replaced_after_an_error(monkeypatch):
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", FakeGrpcClient)
    stream = client.GrpcStream("h:1")
    fake = stream._client
    fake.scripts = [
        [(grpc_result("one", False), None), (grpc_result(None, True), None)],
        [(grpc_result("two", False), None), (None, InferenceServerException(msg="boom"))],
        [(grpc_result("three", True), None)],
    ]
    assert list(stream.generate("p", 2, timeout=1)) == ["one"]
    with pytest.raises(InferenceServerException, match="boom"):
        list(stream.generate("p", 2, timeout=1, sampling=Sampling(seed=1)))
    assert list(stream.generate("p", 2, timeout=1)) == ["three"]
    stream.close()
    assert fake.calls == ["start", "stop(cancel=True)", "start", "stop(cancel=True)", "close"]
    assert fake.requests == [["input", "output_length"], ["input", "output_length", "seed"],
                             ["input", "output_length"]]


def test_an_abandoned_request_closes_its_stream(monkeypatch):
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", FakeGrpcClient)
    stream = client.GrpcStream("h:1")
    stream._client.scripts = [[(grpc_result("a", False), None), (grpc_result("b", True), None)]]
    pieces = stream.generate("p", 2, timeout=1)
    assert next(pieces) == "a"
    pieces.close()
    assert stream._client.calls == ["start", "stop(cancel=True)"]


# ---------------------------------------------------------------------------------------------------
# HTTP streaming: the generate_stream endpoint's server-sent events
# ---------------------------------------------------------------------------------------------------


def test_sse_data_joins_data_lines_and_skips_comments_and_other_fields():
    raw = [b": keep-alive\n", b"data: {\"a\": 1}\n", b"\n", b"event: x\r\n", b"data:first\r\n", b"data: second\r\n",
           b"\r\n", b"id: 7\n", b"data: last without a blank line\n"]
    assert list(client.sse_data(raw)) == ['{"a": 1}', "first\nsecond", "last without a blank line"]


@pytest.mark.parametrize("payload, piece", [
    ({"model_name": "OPT_stream", "model_version": "1", "output": " word"}, " word"),
    ({"output": [[" nested"]]}, " nested"),
    ({"model_name": "OPT_stream"}, ""),
    ({"output": []}, ""),
])
def test_event_piece_reads_the_output(payload: dict, piece: str):
    assert client.event_piece(json.dumps(payload)) == piece


def test_event_piece_raises_an_error_event():
    with pytest.raises(InferenceServerException, match="top_k must be"):
        client.event_piece(json.dumps({"error": "top_k must be <= 50272"}))


def test_generate_stream_body_has_one_key_per_input_given():
    body = json.loads(client.generate_stream_body("Hi", 4, Sampling(temperature=0.5, ignore_eos=True)))
    assert body == {"input": "Hi", "output_length": 4, "temperature": 0.5, "ignore_eos": True}


def test_http_error_message_prefers_tritons_error_field():
    assert client.http_error_message(b'{"error": "unknown model"}', 400) == "unknown model"
    # A model that raises before its first response: Triton sets the error status and sends it as an event.
    body = b'data: {"error":"Traceback...\\nbad top_p\\n"}\n\n'
    assert client.http_error_message(body, 400) == "Traceback...\nbad top_p\n"
    assert client.http_error_message(b"<html>oops</html>", 502) == "HTTP 502: <html>oops</html>"


class FakeTriton(http.server.BaseHTTPRequestHandler):
    """Answers readiness and generate_stream as Triton does; `script` says what the stream sends."""

    script: list[bytes] = []
    status = 200
    bodies: list[dict] = []

    def do_GET(self) -> None:  # tritonclient.http's is_model_ready
        self.send_response(200 if self.path == "/v2/models/OPT_stream/ready" else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        assert self.path == "/v2/models/OPT_stream/generate_stream"
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        if self.status != 200:
            body = json.dumps({"error": "output_length must be at least 1, got 0"}).encode()
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in self.script:
            self.wfile.write(chunk)
            self.wfile.flush()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def fake_triton() -> Iterator[type[FakeTriton]]:
    handler = type("Handler", (FakeTriton,), {"script": [], "status": 200, "bodies": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_http_stream_prints_pieces_and_sends_only_the_settings_given(fake_triton, capsys):
    fake_triton.script = [sse({"model_name": "OPT_stream", "output": " Warsaw"}), sse({"output": ", of course"}),
                          sse({"model_name": "OPT_stream", "output": ""})]
    status = client.main(["--server-url", fake_triton.url, "--stream", "--input", "The capital of Poland is",
                          "--output-length", "4", "--top-p", "0.5", "--timeout", "10"])
    assert status == 0
    assert capsys.readouterr().out == "The capital of Poland is Warsaw, of course\n"
    assert fake_triton.bodies == [{"input": "The capital of Poland is", "output_length": 4, "top_p": 0.5}]


def test_http_stream_error_event_is_reported(fake_triton, capsys):
    fake_triton.script = [sse({"output": " a"}), sse({"error": "generation failed: lost rank 1"})]
    assert client.main(["--server-url", fake_triton.url, "--stream", "--input", "X", "--timeout", "10"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "X a\n"
    assert captured.err == "error: generation failed: lost rank 1\n"


def test_http_stream_refused_before_inference_is_reported(fake_triton, capsys):
    fake_triton.status = 400
    assert client.main(["--server-url", fake_triton.url, "--stream", "--output-length", "0", "--timeout", "10"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: output_length must be at least 1, got 0\n"


def test_stream_from_a_server_that_never_gets_ready_prints_nothing(capsys):
    from serving import free_ports

    (port,) = free_ports(1)
    assert client.main(["--server-url", f"http://127.0.0.1:{port}", "--stream", "--timeout", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: model 'OPT_stream' not ready after 1 s\n"
