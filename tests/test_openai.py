"""The OpenAI-compatible front end of a real server, driven by clients nobody here wrote: the official
`openai` package (plain, streamed with usage, stop strings, seeds, every error class) and curl (the SSE
framing). Its text must equal the Triton model `OPT`'s for the same prompt and settings."""
from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest

import client
from serving import (MIXED_LENGTHS, MIXED_PROMPTS, ServerProcess, infer, metric, openai_texts, running_server,
                     start_server, wait_metric, wait_ready)

API_KEY = "test-key-0123456789"
SERVED_NAME = "opt-tiny"
SLOTS = 2
BATCH = 8  # --max-batch-size and --max-queue-size
LONG = 1500  # tokens: a row that outlives the test's waits unless it is ended


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("openai"), cache_dir, "--api-key", API_KEY, "--served-model-name",
                        SERVED_NAME, "--decode-slots", str(SLOTS), "--max-batch-size", str(BATCH), "--max-queue-size",
                        str(BATCH)) as srv:
        yield srv


@pytest.fixture
def api(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key=API_KEY, max_retries=0, timeout=120)


def get(server: ServerProcess, path: str) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a GET on the front end, with the API key."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.openai_port}{path}",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_models_lists_the_model_name_and_the_served_name(api: openai.OpenAI):
    assert [m.id for m in api.models.list().data] == ["random/tiny", SERVED_NAME]


def test_greedy_text_equals_the_triton_models_for_every_prompt(server: ServerProcess):
    assert openai_texts(server, MIXED_PROMPTS, MIXED_LENGTHS, api_key=API_KEY) == \
        infer(server.http_url, MIXED_PROMPTS, MIXED_LENGTHS)


def test_a_list_of_prompts_and_token_ids_get_one_choice_each_with_usage(api: openai.OpenAI, server: ServerProcess):
    expected = infer(server.http_url, MIXED_PROMPTS[:2], [6, 6])
    result = api.completions.create(model=SERVED_NAME, prompt=MIXED_PROMPTS[:2], max_tokens=6, echo=True)
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == expected
    assert result.object == "text_completion" and result.model == SERVED_NAME and result.id.startswith("cmpl-")
    assert result.usage.completion_tokens <= 12 and result.usage.total_tokens == \
        result.usage.prompt_tokens + result.usage.completion_tokens
    ids = api.completions.create(model=SERVED_NAME, prompt=[2, 31414, 232], max_tokens=4)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].finish_reason in ("length", "stop")


def test_a_stream_adds_up_to_the_plain_text_then_its_usage(api: openai.OpenAI):
    prompt, length = MIXED_PROMPTS[3], MIXED_LENGTHS[3]
    whole = api.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=length)
    chunks = list(api.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=length, stream=True,
                                         stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_curl_sees_server_sent_events_ending_with_done(server: ServerProcess):
    curl = shutil.which("curl")
    assert curl, "curl is needed"
    body = json.dumps({"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 5, "stream": True})
    result = subprocess.run([curl, "-sN", "-H", f"Authorization: Bearer {API_KEY}", "-H",
                             "Content-Type: application/json", "-d", body, "-D", "-",
                             f"http://127.0.0.1:{server.openai_port}/v1/completions"],
                            capture_output=True, timeout=60)  # bytes: text mode would turn \r\n into \n
    head, _, events = result.stdout.decode().partition("\r\n\r\n")
    assert "content-type: text/event-stream" in head.lower()
    frames = events.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: {") for f in frames[:-2]) and len(frames) > 3
    assert json.loads(frames[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_the_text_ends_before_the_first_stop_string(api: openai.OpenAI, server: ServerProcess):
    prompt = MIXED_PROMPTS[0]
    whole = api.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=20).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop.strip(), whole
    cut = whole[:whole.find(stop)]
    stops = 'opt_request_success_total{api="openai",finished_reason="stop"}'
    before = metric(server, stops, 0.0)
    # Greedy: a longer row has the same start. Its 400 tokens outlast the stop's way back to the engine.
    stopped = api.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=400, stop=[stop, "never seen"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    wait_metric(server, stops, before + 1, 10, "a row ended on its stop string counts as ended whole, on stop")
    streamed = api.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_a_seed_gives_the_triton_models_sampled_text(api: openai.OpenAI, server: ServerProcess):
    settings = dict(temperature=0.9, top_p=0.95, seed=11)
    triton = infer(server.http_url, ["Tell me a story"], [12], sampling=client.Sampling(**settings))[0]
    texts = {"Tell me a story" + api.completions.create(model=SERVED_NAME, prompt="Tell me a story", max_tokens=12,
                                                          extra_body={"top_k": 0}, **settings).choices[0].text
             for _ in range(2)}
    assert texts == {triton}
    other = api.completions.create(model=SERVED_NAME, prompt="Tell me a story", max_tokens=12, temperature=0.9,
                                   top_p=0.95, seed=12).choices[0].text
    assert "Tell me a story" + other != triton


def test_n_choices_per_prompt_take_seeds_s_s_plus_1_and_count_their_prompt_once(api: openai.OpenAI,
                                                                                server: ServerProcess):
    prompts, settings = ["Tell me a story", "Once"], dict(temperature=0.9, top_p=0.95)
    result = api.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=6, n=3, seed=40, **settings)
    choices = sorted(result.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == list(range(6))  # prompt-major: choice 3 * p + j
    for p, prompt in enumerate(prompts):
        expected = [infer(server.http_url, [prompt], [6], sampling=client.Sampling(seed=40 + j, **settings))[0]
                    for j in range(3)]
        assert [prompt + c.text for c in choices[3 * p:3 * p + 3]] == expected
        assert len(set(expected)) > 1, expected  # the seeds differ, so the choices do
    prompt_tokens = api.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=1).usage.prompt_tokens
    assert result.usage.prompt_tokens == prompt_tokens  # not three times over
    streamed: dict[int, str] = {}
    for chunk in api.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=6, n=3, seed=40, stream=True,
                                        **settings):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(6)] == [c.text for c in choices]


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"), (dict(prompt=["a", "b"], n=BATCH // 2 + 1), "n"), (dict(logprobs=2), "logprobs"), (dict(extra_body={"top_k": -1}), "top_k"),
    (dict(stop=[""]), "stop"), (dict(extra_body={"seed": "x"}), "seed"),
    (dict(prompt="word " * 3000), "prompt"), (dict(prompt=[[5], [99999999]]), "prompt"),
    (dict(prompt=["a"] * (BATCH + 1)), "prompt"),
])
def test_a_bad_parameter_is_a_400_naming_it_and_the_server_goes_on(api: openai.OpenAI, kwargs: dict, param: str):
    request = dict(model=SERVED_NAME, prompt="Hello", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as raised:
        api.completions.create(**request)
    assert raised.value.status_code == 400 and raised.value.body["param"] == param, raised.value.body
    assert raised.value.body["type"] == "invalid_request_error" and raised.value.body["message"]
    assert api.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=2).choices[0].text


def test_a_missing_or_wrong_key_is_401_an_unknown_model_404_and_chat_404(server: ServerProcess, api: openai.OpenAI):
    for key in ("wrong-key", ""):
        stranger = openai.OpenAI(base_url=server.openai_url, api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as raised:
        api.completions.create(model="facebook/opt-66b", prompt="Hi", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        api.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}])
    assert "no chat template" in raised.value.body["message"]
    assert get(server, "/health")[0] == 200 and get(server, "/health/ready")[0] == 200


def test_a_deadline_is_504(api: openai.OpenAI):
    with pytest.raises(openai.InternalServerError) as raised:
        api.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=LONG,
                               extra_body={"ignore_eos": True, "timeout_seconds": 0.5})
    assert raised.value.status_code == 504 and "timed out" in raised.value.body["message"]


def test_a_full_queue_is_503_with_retry_after_and_clients_that_leave_free_their_slots(server: ServerProcess,
                                                                                      api: openai.OpenAI):
    body = {"model": SERVED_NAME, "prompt": ["Busy"] * BATCH, "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    stream = http.client.HTTPConnection("127.0.0.1", server.openai_port, timeout=60)
    stream.request("POST", "/v1/completions", json.dumps(body), headers)  # 2 rows running, 6 waiting
    response = stream.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    wait_metric(server, "opt_busy_slots", SLOTS, 30, "the stream holds both slots")
    refused = http.client.HTTPConnection("127.0.0.1", server.openai_port, timeout=60)
    refused.request("POST", "/v1/completions", json.dumps(body | {"stream": False}), headers)
    answer = refused.getresponse()
    assert answer.status == 503 and answer.getheader("Retry-After") == "1"
    assert "overloaded" in json.loads(answer.read())["error"]["message"]
    refused.close()
    stream.close()  # the client goes away mid-stream
    wait_metric(server, "opt_busy_slots", 0, 30, "a client that disconnects frees its slot")
    assert api.completions.create(model=SERVED_NAME, prompt="After", max_tokens=3).choices[0].text


def test_sigterm_drains_the_front_end_as_it_drains_triton(tmp_path: Path, cache_dir: Path):
    srv = start_server(tmp_path, cache_dir, "--exit-timeout", "30")
    try:
        wait_ready(srv)
        api = openai.OpenAI(base_url=srv.openai_url, api_key="none", max_retries=0, timeout=60)
        stream = api.completions.create(model="random/tiny", prompt="Long", max_tokens=300, stream=True,
                                        extra_body={"ignore_eos": True})
        first = next(iter(stream))
        srv.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while get(srv, "/health/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body, headers = get(srv, "/health/ready")
        assert status == 503 and headers["Retry-After"] == "1"
        with pytest.raises(openai.APIStatusError) as raised:
            api.completions.create(model="random/tiny", prompt="Late", max_tokens=2)
        assert raised.value.status_code == 503 and "draining" in raised.value.body["message"]
        rest = [c for c in stream if c.choices]
        assert rest[-1].choices[0].finish_reason == "length"
        assert len("".join([first.choices[0].text, *(c.choices[0].text for c in rest)])) > 0
        assert srv.process.wait(timeout=60) == 0
        assert "OpenAI front end stopped" in srv.log()
    finally:
        srv.kill_group()


def test_the_api_answers_from_the_moment_triton_reports_a_model_ready(tmp_path: Path, cache_dir: Path):
    """Triton's readiness is what the charts' probes and client.py wait for: the API is bound by then (it once
    was bound only after Triton's start returned, and a request right after client.py's was refused)."""
    srv = start_server(tmp_path, cache_dir)
    try:
        wait_ready(srv, models=("OPT",), poll=0.01)  # the first model Triton reports, at once
        assert get(srv, "/health/ready")[0] == 200  # a refused connection raises here
    finally:
        srv.stop()
        srv.kill_group()


def test_openai_requests_beside_triton_requests_keep_their_text(server: ServerProcess):
    expected = infer(server.http_url, MIXED_PROMPTS[:4], MIXED_LENGTHS[:4])
    results: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("openai", openai_texts(
                   server, MIXED_PROMPTS[:4], MIXED_LENGTHS[:4], api_key=API_KEY))),
               threading.Thread(target=lambda: results.__setitem__("triton", infer(
                   server.http_url, MIXED_PROMPTS[:2], MIXED_LENGTHS[:2]) + infer(
                   server.grpc_url, MIXED_PROMPTS[2:4], MIXED_LENGTHS[2:4])))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {"openai": expected, "triton": expected}


def test_the_vllm_style_metrics_count_each_front_end_on_its_own(server: ServerProcess, api: openai.OpenAI):
    """Each row's prompt and generated tokens, its end and its latencies land under its own `api` label."""
    wait_metric(server, "opt_busy_slots", 0, 60, "an earlier test left a row running")
    names = [f'{family}{{api="{api_name}"{extra}}}' for api_name in ("openai", "triton") for family, extra in [
        ("opt_prompt_tokens_total", ""), ("opt_generation_tokens_total", ""),
        ("opt_request_success_total", ',finished_reason="length"'), ("opt_e2e_request_latency_seconds_count", ""),
        ("opt_inter_token_latency_seconds_count", "")]]
    before = {name: metric(server, name, 0.0) for name in names}
    api.completions.create(model=SERVED_NAME, prompt=[2, 31414, 232], max_tokens=5, extra_body={"ignore_eos": True})
    infer(server.http_url, ["Hello"], [7], sampling=client.Sampling(ignore_eos=True))  # BOS + "Hello": 2 tokens
    added = [metric(server, name) - before[name] for name in names]
    assert added == [3, 5, 1, 1, 4, 2, 7, 1, 1, 6]  # prompt, generated, ended on length, latencies, gaps
    for gauge in ('opt_num_requests_running{api="openai"}', 'opt_num_requests_waiting{api="triton"}',
                  "opt_kv_cache_usage_perc"):
        assert metric(server, gauge) == 0, gauge
