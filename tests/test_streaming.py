"""The engine through a real server: streaming (gRPC and HTTP), sampling inputs, continuous batching, metrics."""
from __future__ import annotations

import concurrent.futures
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import client
import opt_utils
import triton_models
from serving import MIXED_LENGTHS, MIXED_PROMPTS, ServerProcess, infer, run_client, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    with running_server(tmp_path_factory.mktemp("streaming"), cache_dir, "--max-batch-size", "8",
                        "--model-instances", "2", "--decode-slots", "4") as srv:
        yield srv


def pieces(url: str, prompt: str, length: int, sampling: client.Sampling = client.Sampling()) -> list[str]:
    return list(client.stream_pieces(url, prompt, length, 120, sampling))


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_stream_sends_the_generated_text_in_pieces_that_add_up_to_what_opt_returns(server: ServerProcess,
                                                                                     protocol: str):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    whole = infer(server.http_url, ["Once upon a time"], [24])[0]
    streamed = pieces(url, "Once upon a time", 24)
    assert len([p for p in streamed if p]) > 3, streamed  # several responses, not one at the end
    assert "Once upon a time" + "".join(streamed) == whole


def test_stream_pieces_never_split_a_multibyte_character():
    tokenizer = opt_utils.ByteLevelBPETokenizer.from_gpt2_files(2)
    text = " Zażółć gęślą jaźń 😀🚀 日本語のテキスト"
    ids = tokenizer.encode(text)[1:]
    assert len(ids) > len(text.split()), "the test needs characters spread over several tokens"
    stream = triton_models.TextStream(tokenizer)
    out = [stream.push(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) == text
    assert sum(1 for piece in out if piece) > 5


def test_the_stream_model_takes_one_row_per_request(server: ServerProcess):
    import tritonclient.grpc as grpc

    inputs = client.request_inputs(grpc, [b"one", b"two"], [4, 4])
    errors: list[str] = []
    done = threading.Event()

    def callback(result, error):
        if error is not None:
            errors.append(str(error))
        done.set()

    connection = grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    connection.start_stream(callback=callback)
    connection.async_stream_infer(client.STREAM_MODEL_NAME, inputs)
    assert done.wait(30)
    connection.stop_stream()
    connection.close()
    assert errors and ("batch" in errors[0] or "one row" in errors[0]), errors


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_stream_prints_the_same_text_as_a_plain_request(server: ServerProcess, protocol: str):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    args = ("--server-url", url, "--input", "The capital of Poland is", "--output-length", "14")
    plain = run_client(*args)
    streamed = run_client(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    text = eval(plain.stdout[len("output: "):])[0]  # the printed Python list literal
    assert streamed.stdout.strip() == text.strip()


# --- sampling -------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_text_and_another_seed_another(server: ServerProcess):
    settings = lambda seed: client.Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
    first = infer(server.http_url, ["Tell me a story"], [20], sampling=settings(7))[0]
    again = infer(server.grpc_url, ["Tell me a story"], [20], sampling=settings(7))[0]
    streamed = "Tell me a story" + "".join(pieces(server.grpc_url, "Tell me a story", 20, settings(7)))
    other = infer(server.http_url, ["Tell me a story"], [20], sampling=settings(8))[0]
    greedy = infer(server.http_url, ["Tell me a story"], [20])[0]
    assert first == again == streamed
    assert other != first and greedy != first


def test_sampled_rows_keep_their_text_beside_other_rows(server: ServerProcess):
    seeded = client.Sampling(temperature=0.8, seed=11)
    alone = infer(server.http_url, ["Tell me a story"], [12], sampling=seeded)[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(infer, server.grpc_url, [p], [n]) for p, n in zip(MIXED_PROMPTS[:3], MIXED_LENGTHS)]
        mixed = pool.submit(infer, server.http_url, ["Tell me a story"], [12], 120, seeded)
        assert mixed.result()[0] == alone
        for future in others:
            future.result()


def test_temperature_zero_and_no_settings_are_the_same_greedy_text(server: ServerProcess):
    plain = infer(server.http_url, ["Greedy"], [10])[0]
    assert infer(server.http_url, ["Greedy"], [10], sampling=client.Sampling(temperature=0.0, seed=3))[0] == plain


@pytest.mark.parametrize(
    "sampling, message",
    [
        (client.Sampling(temperature=-0.5), "row 0: temperature -0.5 must be >= 0 and <= 100"),
        (client.Sampling(temperature=float("nan")), "row 0: temperature nan must be"),
        (client.Sampling(top_k=-1), "row 0: top_k -1 must be >= 0 and <= 50272"),
        (client.Sampling(top_k=60000), "row 0: top_k 60000 must be >= 0 and <= 50272"),
        (client.Sampling(top_p=0.0), "row 0: top_p 0.0 must be > 0 and <= 1"),
        (client.Sampling(top_p=1.5), "row 0: top_p 1.5 must be > 0 and <= 1"),
        (client.Sampling(seed=-1), "row 0: seed -1 must be >= 0"),
    ],
)
def test_sampling_values_out_of_range_get_an_error_naming_them(server: ServerProcess, sampling, message: str):
    for url in (server.http_url, server.grpc_url):
        with pytest.raises(InferenceServerException, match=message.replace("(", r"\(")):
            infer(url, ["Hello"], [4], sampling=sampling)
    assert infer(server.http_url, ["Still serving"], [3])[0].startswith("Still serving")


# --- continuous batching --------------------------------------------------------------------------


def test_a_short_request_finishes_while_a_long_one_is_still_streaming(server: ServerProcess):
    long_pieces: list[str] = []
    long_done = threading.Event()

    def long_stream() -> None:
        for piece in client.stream_pieces(server.grpc_url, "A very long story:", 1500, 300,
                                          client.Sampling(ignore_eos=True)):
            long_pieces.append(piece)
        long_done.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        while len(long_pieces) < 5:  # the long one is decoding
            assert thread.is_alive()
            time.sleep(0.05)
        began = time.monotonic()
        short = infer(server.http_url, ["Short"], [4])[0]
        took = time.monotonic() - began
        assert short.startswith("Short")
        assert not long_done.is_set(), "the short request waited for the long one"
    finally:
        thread.join(timeout=300)
    assert long_done.is_set()
    assert took < 10, took


def test_concurrent_streams_and_plain_requests_each_equal_the_request_alone(server: ServerProcess):
    alone = [infer(server.http_url, [p], [n])[0] for p, n in zip(MIXED_PROMPTS, MIXED_LENGTHS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = []
        for i, (p, n) in enumerate(zip(MIXED_PROMPTS, MIXED_LENGTHS)):
            if i % 2:
                futures.append(pool.submit(lambda p=p, n=n: p + "".join(pieces(server.grpc_url, p, n))))
            else:
                futures.append(pool.submit(lambda p=p, n=n: infer(server.grpc_url, [p], [n])[0]))
        assert [f.result() for f in futures] == alone


# --- metrics --------------------------------------------------------------------------------------


def scrape(server: ServerProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.generation_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_generation_metrics_count_tokens_requests_and_times_in_prometheus_format(server: ServerProcess):
    before = scrape(server)
    infer(server.http_url, ["Count me", "and me"], [6, 6], sampling=client.Sampling(ignore_eos=True))
    after = scrape(server)
    assert after["opt_generated_tokens_total"] - before.get("opt_generated_tokens_total", 0) == 12
    assert after["opt_requests_total{outcome=ok}"] - before.get("opt_requests_total{outcome=ok}", 0) == 2
    assert after["opt_time_to_first_token_seconds_count"] - before.get("opt_time_to_first_token_seconds_count", 0) == 2
    assert after["opt_time_per_output_token_seconds_count"] > 0
    assert after["opt_decode_slots"] == 4
    assert after["opt_busy_slots"] == 0 and after["opt_queue_length"] == 0
    assert np.isfinite(after["opt_time_to_first_token_seconds_sum"])
