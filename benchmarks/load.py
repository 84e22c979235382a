#!/usr/bin/env python3
"""A load generator: N concurrent clients, a realistic seeded mix of requests, latency percentiles.

    python benchmarks/load.py --model-name random/125M --clients 16 --duration 60
    python benchmarks/load.py --model-name random/tiny --clients 4 --duration 10 --protocol http
    python benchmarks/load.py --model-name random/125M --clients 16 --requests-per-client 8 --compare

Each client is a thread that sends one request, waits for its answer, and sends the next (a closed
loop), for --duration seconds (requests in flight at the end still finish) or --requests-per-client
requests. By default the requests go over gRPC streaming to the decoupled model `OPT_stream`: time to
first token (TTFT) is the arrival of the first response carrying a non-empty piece of text, the
end-to-end latency the arrival of the final response. --protocol http sends them to the
non-streaming model `OPT` over HTTP instead; TTFT is then not measured.

The mix is seeded and fixed per client: client c's k-th request is the same in every run, whatever
the timing, so two servers get the same requests in the same order. Prompt lengths are uniform in
--prompt-range and output lengths uniform in --output-range (both inclusive). A prompt's length
counts OPT's BOS token, as the server does: a prompt of n tokens is n - 1 random words, each one
token by itself and after a space, and its length is checked with the tokenizer the server uses
(`opt_utils.load_tokenizer`, which for random/* models offline is GPT-2's byte-level BPE).

Output tokens are not counted from the text (re-tokenizing random text does not give back the
generated token count): every request sends ignore_eos=True, so the server generates exactly its
output_length, and that is the count. --no-ignore-eos leaves the input out (a server that does not
know it), and then the counts are the requested lengths, which random weights reach all but always
(EOS is one token in 50272). For a server started here, its own generated-token counter (Prometheus
`opt_generated_tokens`) is read before and after each run as a check: the JSON has it as
server_counted_tokens, and a difference is logged.

Time per output token (TPOT) is (end-to-end - TTFT) / (tokens - 1) when streaming, and end-to-end /
tokens over HTTP (no TTFT to take out). Output tokens/s is every finished request's tokens over the
wall time from the first send to the last answer.

--compare starts `server.py` itself twice on free loopback ports with the same model and flags, first
as is (continuous batching), then with --one-batch-at-a-time (one Triton batch at a time, run to its
end), and runs the same load against each, one after the other (never sharing the CPU); then the
Hugging Face baseline: transformers' PyTorch `OPTForCausalLM` with random weights of the same shape,
`generate` (greedy, min_new_tokens = max_new_tokens) on the same requests, taken `--clients` at a time
(left padded): round k is every client's k-th request. A batch runs to its longest output, and only the
tokens each request asked for are counted. A request's latency there is measured from the start of
its batch to the end of it: like a client of the servers, which sends its next request when the
previous one is answered, a round starts when the previous round is done. Its TTFT is the time to
the batch's first token (the prefill). The servers hold the server's default --decode-slots
sequences at once (16, the default --clients); --server-arg=--decode-slots=N changes both. They run
through tests/serving.py's start_server, which sets JAX_PLATFORMS=cpu: on a GPU machine, start the
server yourself and point --server-url at it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from client import (MODEL_NAME, GrpcStream, Sampling, request_inputs, server_error,  # noqa: E402
                    triton_url, wait_until_ready)

# Common English words: those that are one token alone and after a space (checked against the
# tokenizer at start) make prompts of an exact token count that still read like words.
CANDIDATE_WORDS = """
the of and to in is was for on that with as by at from his her they this are be it an have had not
but one all were we when there can which their said if do will each about how up out them then she
many some so these would other into has more two like him time see no could make than first been
who its now people my made over did down only way find use may water long little very after words
called just where most know get through back much go good new write our me man too any day same
right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell
men say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
looked show large often together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above kind
began almost live page got earth need far hand high year mother light country father let night
picture being study second soon story since white ever paper hard near sentence better best across
during today however sure knew try told young sun thing whole hear example heard several change
answer room sea against top turned learn point city play toward five himself usually money seen
car morning body upon family later turn move face door cut done group true leave color red friends
""".split()


# ---------------------------------------------------------------------------------------------------
# The request mix
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixSettings:
    """What makes the mix: the seed and the inclusive ranges of prompt and output lengths (tokens)."""

    seed: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request of the mix: client `client`'s `index`-th."""

    client: int
    index: int
    prompt: str
    prompt_tokens: int  # BOS included, as the server counts
    output_tokens: int


class PromptBuilder:
    """Builds prompts of an exact token count from words that the tokenizer keeps whole."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # the clients' threads share it; a Rust tokenizer may refuse concurrent use
        bos = len(tokenizer.encode(""))  # OPT's tokenizers put BOS in front of every prompt
        self._extra = bos
        self.words = [w for w in CANDIDATE_WORDS
                      if len(tokenizer.encode(w)) == bos + 1 and len(tokenizer.encode(" " + w)) == bos + 1]
        if len(self.words) < 20:
            raise RuntimeError(f"only {len(self.words)} single-token words for {tokenizer.description}")

    def prompt(self, rng: random.Random, tokens: int) -> str:
        """A prompt that the tokenizer encodes into exactly `tokens` ids (BOS included)."""
        if tokens <= self._extra:
            raise ValueError(f"a prompt needs more than {self._extra} tokens, asked for {tokens}")
        text = " ".join(rng.choice(self.words) for _ in range(tokens - self._extra))
        with self._lock:
            counted = len(self._tokenizer.encode(text))
        if counted != tokens:
            raise AssertionError(f"built a prompt of {counted} tokens instead of {tokens}: {text!r}")
        return text


def client_requests(client: int, mix: MixSettings, builder: PromptBuilder) -> Iterator[RequestSpec]:
    """Client `client`'s endless, seeded sequence of requests: the same in every run."""
    rng = random.Random(mix.seed * 1_000_003 + client)
    index = 0
    while True:
        prompt_tokens = rng.randint(*mix.prompt_range)
        output_tokens = rng.randint(*mix.output_range)
        yield RequestSpec(client, index, builder.prompt(rng, prompt_tokens), prompt_tokens, output_tokens)
        index += 1


# ---------------------------------------------------------------------------------------------------
# Sending requests and timing them
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What happened to one request; times in seconds, `start` from the start of the run."""

    spec: RequestSpec
    start: float
    latency: float | None = None  # send -> final response
    ttft: float | None = None  # send -> first non-empty piece (streaming only)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency is not None


class StreamSender:
    """One client's gRPC stream to `OPT_stream`."""

    def __init__(self, address: str, ignore_eos: bool, timeout: float):
        self._stream = GrpcStream(address)
        self._sampling = Sampling(ignore_eos=True if ignore_eos else None)
        self._timeout = timeout

    def wait_until_ready(self, timeout: float) -> None:
        self._stream.wait_until_ready(timeout)

    def send(self, spec: RequestSpec, outcome: Outcome, sampling: Sampling | None = None) -> str:
        """Times one request into `outcome`; returns the generated text. `sampling` replaces the sender's."""
        begin = time.perf_counter()
        pieces = []
        sampling = sampling or self._sampling
        for piece in self._stream.generate(spec.prompt, spec.output_tokens, self._timeout, sampling):
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - begin
            pieces.append(piece)
        outcome.latency = time.perf_counter() - begin
        return "".join(pieces)

    def close(self) -> None:
        self._stream.close()


class HttpSender:
    """One client's HTTP connection to the non-streaming model `OPT`."""

    def __init__(self, address: str, ignore_eos: bool, timeout: float):
        import tritonclient.http as triton

        self._triton = triton
        self._client = triton.InferenceServerClient(address, connection_timeout=timeout, network_timeout=timeout)
        self._sampling = Sampling(ignore_eos=True if ignore_eos else None)
        self._timeout = timeout

    def wait_until_ready(self, timeout: float) -> None:
        wait_until_ready(self._client, timeout)

    def send(self, spec: RequestSpec, outcome: Outcome, sampling: Sampling | None = None) -> str:
        """Times one request into `outcome`; returns the prompt and generated text, as `OPT` answers."""
        inputs = request_inputs(self._triton, [spec.prompt.encode("utf-8")], [spec.output_tokens],
                                sampling=sampling or self._sampling)
        begin = time.perf_counter()
        result = self._client.infer(MODEL_NAME, inputs)
        outcome.latency = time.perf_counter() - begin
        return result.as_numpy("output").reshape(-1)[0].decode("utf-8")

    def close(self) -> None:
        self._client.close()


def error_text(error: BaseException) -> str:
    """A short message to count errors by: the server's own words where PyTriton wrapped them."""
    message = error.message() if hasattr(error, "message") and callable(error.message) else None
    text = server_error(message or str(error) or type(error).__name__, verbose=False).strip()
    return (text.splitlines() or [""])[0][:300]


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    clients: int
    duration: float | None  # seconds to keep sending, or None with requests_per_client
    requests_per_client: int | None
    timeout: float


def client_loop(make_sender: Callable[[], Any], requests: Iterator[RequestSpec], settings: LoadSettings,
                run_start: float, outcomes: list[Outcome]) -> None:
    """One client: sends requests back to back until the deadline or the count, recording each in
    `outcomes`. Its sender is made and closed here: tritonclient's HTTP client (gevent) works only in
    the thread that made it."""
    deadline = None if settings.duration is None else run_start + settings.duration
    sender = make_sender()
    try:
        for spec in requests:
            if settings.requests_per_client is not None and spec.index >= settings.requests_per_client:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            outcome = Outcome(spec, start=time.perf_counter() - run_start)
            try:
                sender.send(spec, outcome)
            except Exception as error:  # counted by message; the client goes on with its next request
                outcome.error = error_text(error)
            outcomes.append(outcome)
    finally:
        sender.close()


@dataclasses.dataclass
class LoadRun:
    outcomes: list[Outcome]
    wall_s: float  # first send -> last answer


def wait_for_model(make_sender: Callable[[], Any], timeout: float) -> None:
    """Waits for the model the senders use to be ready (a server still compiling)."""
    sender = make_sender()
    try:
        sender.wait_until_ready(timeout)
    finally:
        sender.close()


def run_load(make_sender: Callable[[], Any], settings: LoadSettings, mix: MixSettings,
             builder: PromptBuilder, ready_timeout: float) -> LoadRun:
    """Runs every client in its own thread against one server; returns every request's outcome."""
    wait_for_model(make_sender, ready_timeout)
    per_client: list[list[Outcome]] = [[] for _ in range(settings.clients)]
    run_start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, name=f"client-{c}", daemon=True,
                                args=(make_sender, client_requests(c, mix, builder), settings, run_start,
                                      per_client[c]))
               for c in range(settings.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - run_start
    outcomes = sorted((o for found in per_client for o in found), key=lambda o: (o.start, o.spec.client))
    return LoadRun(outcomes, wall)


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Percentiles | None":
        """Linear-interpolated percentiles (numpy's default); None when there is nothing to rank."""
        if not values:
            return None
        p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
        return cls(float(p50), float(p90), float(p99))


@dataclasses.dataclass(frozen=True)
class ShortRequests:
    """Which requests count as short: prompt and output both at most these many tokens."""

    prompt: int
    output: int

    def __contains__(self, spec: RequestSpec) -> bool:
        return spec.prompt_tokens <= self.prompt and spec.output_tokens <= self.output


@dataclasses.dataclass
class Summary:
    """One run's report; latencies in seconds."""

    name: str
    requests: int  # finished without error
    errors: dict[str, int]
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    ttft: Percentiles | None
    ttft_short: Percentiles | None
    short_requests: int
    latency: Percentiles | None
    tpot_p50: float | None
    server_counted_tokens: int | None = None  # the server's own count over the run, where readable


def time_per_output_token(outcome: Outcome) -> float | None:
    """Decode time per token: the first token's wait taken out when it was measured."""
    tokens = outcome.spec.output_tokens
    if outcome.ttft is not None:
        return (outcome.latency - outcome.ttft) / (tokens - 1) if tokens > 1 else None
    return outcome.latency / tokens


def summarize(name: str, run: LoadRun, short: ShortRequests) -> Summary:
    done = [o for o in run.outcomes if o.ok]
    errors = collections.Counter(o.error for o in run.outcomes if o.error is not None)
    tokens = sum(o.spec.output_tokens for o in done)
    short_done = [o for o in done if o.spec in short]
    tpots = [t for t in map(time_per_output_token, done) if t is not None]
    return Summary(
        name=name,
        requests=len(done),
        errors=dict(errors.most_common()),
        output_tokens=tokens,
        wall_s=run.wall_s,
        output_tokens_per_s=tokens / run.wall_s if run.wall_s > 0 else 0.0,
        ttft=Percentiles.of([o.ttft for o in done if o.ttft is not None]),
        ttft_short=Percentiles.of([o.ttft for o in short_done if o.ttft is not None]),
        short_requests=len(short_done),
        latency=Percentiles.of([o.latency for o in done]),
        tpot_p50=float(np.median(tpots)) if tpots else None,
    )


# ---------------------------------------------------------------------------------------------------
# The servers under test
# ---------------------------------------------------------------------------------------------------


def server_flags(args: argparse.Namespace) -> list[str]:
    """The flags every server of one comparison gets (the one-batch server one more)."""
    dtype = [] if args.dtype == "auto" else ["--dtype", args.dtype]  # auto: the server's own default
    return [*dtype, "--number-of-gpus", str(args.number_of_gpus), *args.server_arg]


@contextlib.contextmanager
def running_server(args: argparse.Namespace, *extra: str, name: str) -> Iterator[Any]:
    """A `server.py` on free loopback ports, ready; stopped (and whatever it left killed) on exit."""
    from serving import start_server, wait_ready

    with tempfile.TemporaryDirectory(prefix="opt-load-") as tmp:
        server = start_server(Path(tmp), Path(args.cache_dir), *server_flags(args), *extra,
                              model=args.model_name, name=name)
        try:
            begin = time.perf_counter()
            wait_ready(server, timeout=args.ready_timeout)
            log(f"{name}: ready in {time.perf_counter() - begin:.1f} s ({server.http_url}, {server.grpc_url})")
            yield server
        finally:
            server.stop()
            server.kill_group()


def sender_factory(args: argparse.Namespace, server_url: str) -> Callable[[], Any]:
    """Makes one sender per client for the chosen protocol (gRPC streaming or HTTP)."""
    _, address = triton_url(server_url)
    kind = StreamSender if args.protocol == "grpc" else HttpSender
    return lambda: kind(address, args.ignore_eos, args.timeout)


def server_url_for(server: Any, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def generated_tokens(metrics_url: str | None) -> int | None:
    """The server's own count of generated tokens (its opt_generated_tokens counter), where it has one."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode("utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("opt_generated_tokens_total "):
            return int(float(line.split()[1]))
    return None


def metrics_url_of(server: Any) -> str | None:
    """The generation metrics endpoint of a server started here (tests/serving.py gives it a port)."""
    port = getattr(server, "generation_metrics_port", 0)
    return f"http://127.0.0.1:{port}/metrics" if port else None


def load_against(args: argparse.Namespace, url: str, builder: PromptBuilder, name: str, ready_timeout: float,
                 metrics_url: str | None = None) -> tuple[Summary, LoadRun]:
    """Runs the load against the server at `url` once its model is ready (waiting up to `ready_timeout` s).
    Where the server's metrics are at hand, its own token count is kept beside ours as a check."""
    log(f"{name}: {args.clients} clients, "
        + (f"{args.requests_per_client} requests each" if args.requests_per_client else f"{args.duration:g} s"))
    before = generated_tokens(metrics_url)
    run = run_load(sender_factory(args, url), load_settings(args), mix_settings(args), builder, ready_timeout)
    after = generated_tokens(metrics_url)
    summary = summarize(name, run, short_requests(args))
    if before is not None and after is not None:
        summary.server_counted_tokens = after - before
        if summary.server_counted_tokens != summary.output_tokens:
            log(f"{name}: the server counted {summary.server_counted_tokens} generated tokens, we "
                f"{summary.output_tokens} (failed requests, or EOS without --ignore-eos)")
    return summary, run


# ---------------------------------------------------------------------------------------------------
# The Hugging Face baseline: static batches through transformers' generate
# ---------------------------------------------------------------------------------------------------


def hf_config(config: Any) -> Any:
    """transformers' OPTConfig with the sizes and switches of our OPTConfig."""
    import transformers

    return transformers.OPTConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, ffn_dim=config.ffn_dim,
        max_position_embeddings=config.max_position_embeddings, word_embed_proj_dim=config.word_embed_proj_dim,
        do_layer_norm_before=config.do_layer_norm_before, _remove_final_layer_norm=config.remove_final_layer_norm,
        activation_function=config.activation_function, enable_bias=config.enable_bias,
        layer_norm_elementwise_affine=config.layer_norm_elementwise_affine,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def rounds(specs: Sequence[RequestSpec]) -> list[list[RequestSpec]]:
    """The requests grouped by their index in their client's sequence: round k = every k-th request."""
    grouped: dict[int, list[RequestSpec]] = collections.defaultdict(list)
    for spec in sorted(specs, key=lambda s: (s.index, s.client)):
        grouped[spec.index].append(spec)
    return [grouped[k] for k in sorted(grouped)]


def left_padded(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] token ids padded on the left and the matching attention mask."""
    width = max(len(row) for row in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for i, row in enumerate(batch):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


class FirstTokenClock:
    """A logits processor that changes nothing and notes when generate first asks it: the first token."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def hf_batch(model: Any, tokens: Sequence[Sequence[int]], new_tokens: int, pad_id: int) -> tuple[float, float]:
    """Runs one left-padded batch to `new_tokens` new tokens (greedy, EOS ignored); (TTFT, total) seconds."""
    import torch
    import transformers

    ids, mask = left_padded(tokens, pad_id)
    clock = FirstTokenClock()
    begin = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                       logits_processor=transformers.LogitsProcessorList([clock]))
    end = time.perf_counter()
    return (clock.at or end) - begin, end - begin


def hf_model(config: Any, dtype: str, seed: int) -> Any:
    """transformers' PyTorch OPT with random weights (its own init, seeded) in `dtype`, for inference."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(hf_config(config)).to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def hf_baseline(args: argparse.Namespace, specs: Sequence[RequestSpec], config: Any, tokenizer: Any) -> Summary:
    """The same requests through transformers' generate, one round of --clients requests at a time."""
    model = hf_model(config, "float32" if args.dtype == "auto" else args.dtype, args.seed)
    batches = rounds(specs)
    # Untimed: PyTorch's first call pays one-time costs that the servers paid before reporting ready.
    hf_batch(model, [tokenizer.encode(spec.prompt) for spec in batches[0]], 2, config.pad_token_id)
    outcomes = []
    run_start = time.perf_counter()
    for batch in batches:
        start = time.perf_counter() - run_start
        tokens = [tokenizer.encode(spec.prompt) for spec in batch]
        ttft, total = hf_batch(model, tokens, max(s.output_tokens for s in batch), config.pad_token_id)
        outcomes += [Outcome(spec, start=start, latency=total, ttft=ttft) for spec in batch]
        log(f"huggingface: round of {len(batch)} in {total:.1f} s")
    run = LoadRun(outcomes, time.perf_counter() - run_start)
    return summarize("huggingface", run, short_requests(args))


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def milliseconds(p: Percentiles | None) -> str:
    return "n/a" if p is None else f"{p.p50 * 1e3:.0f} / {p.p90 * 1e3:.0f} / {p.p99 * 1e3:.0f}"


def seconds(p: Percentiles | None) -> str:
    return "n/a" if p is None else f"{p.p50:.2f} / {p.p90:.2f} / {p.p99:.2f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    header = ("| run | requests | errors | output tokens/s | TTFT p50 / p90 / p99 (ms) | short TTFT p50 / p90 / p99 "
              "(ms) | end-to-end p50 / p90 / p99 (s) | TPOT p50 (ms) |")
    lines = [header, "|" + " --- |" * 8]
    for s in summaries:
        tpot = "n/a" if s.tpot_p50 is None else f"{s.tpot_p50 * 1e3:.1f}"
        lines.append(f"| {s.name} | {s.requests} | {sum(s.errors.values())} | {s.output_tokens_per_s:.1f} | "
                     f"{milliseconds(s.ttft)} | {milliseconds(s.ttft_short)} ({s.short_requests}) | "
                     f"{seconds(s.latency)} | {tpot} |")
    return "\n".join(lines)


def error_lines(summaries: Sequence[Summary]) -> list[str]:
    return [f"- {s.name}: {count} x {message}" for s in summaries for message, count in s.errors.items()]


def ratios(by_name: dict[str, Summary]) -> dict[str, float | None]:
    """Continuous over one-batch throughput, one-batch over continuous short-request TTFT p99."""
    continuous, one_batch = by_name.get("continuous"), by_name.get("one-batch")
    if continuous is None or one_batch is None:
        return {}
    throughput = (continuous.output_tokens_per_s / one_batch.output_tokens_per_s
                  if one_batch.output_tokens_per_s > 0 else None)
    ttft = (one_batch.ttft_short.p99 / continuous.ttft_short.p99
            if continuous.ttft_short and one_batch.ttft_short and continuous.ttft_short.p99 > 0 else None)
    return {"throughput_continuous_over_one_batch": throughput, "short_ttft_p99_one_batch_over_continuous": ttft}


def ratio_lines(values: dict[str, float | None]) -> list[str]:
    names = {"throughput_continuous_over_one_batch": "output tokens/s, continuous / one-batch",
             "short_ttft_p99_one_batch_over_continuous": "short-request TTFT p99, one-batch / continuous"}
    return [f"- {names[k]}: " + ("n/a" if v is None else f"{v:.2f}x") for k, v in values.items()]


def report(args: argparse.Namespace, summaries: Sequence[Summary], tokenizer: Any) -> dict[str, Any]:
    """Prints the markdown table (and errors, ratios); returns the same as one JSON-ready dict."""
    by_name = {s.name: s for s in summaries}
    found = ratios(by_name)
    print(f"{args.model_name} {args.dtype}, {args.clients} clients, protocol {args.protocol}, prompts "
          f"{args.prompt_range[0]}-{args.prompt_range[1]} tokens, "
          f"outputs {args.output_range[0]}-{args.output_range[1]} "
          f"tokens, seed {args.seed}; short = prompt <= {args.short_prompt} and output <= {args.short_output} "
          f"(count in brackets)\n")
    print(markdown_table(summaries))
    for line in ["", *error_lines(summaries)] if any(s.errors for s in summaries) else []:
        print(line)
    for line in ["", *ratio_lines(found)] if found else []:
        print(line)
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "tokenizer": tokenizer.description,
            "runs": {s.name: dataclasses.asdict(s) for s in summaries}, "ratios": found}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

RUNS = ("continuous", "one-batch", "huggingface")
# A server started here is ready once `OPT` is: a model it serves is ready within seconds of that,
# and one it lacks (`OPT_stream` on a server without streaming) should fail the run soon.
STARTED_MODEL_READY_S = 30.0


def length_range(text: str) -> tuple[int, int]:
    """"LOW,HIGH" (inclusive) -> (LOW, HIGH)."""
    low, high = (int(x) for x in text.split(","))
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def subset_of(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `choices`, returned in their order."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"{what} are a comma-separated subset of {', '.join(choices)}; "
                                             f"got {text!r}")
        return [n for n in choices if n in names]

    return parse


run_names = subset_of(RUNS, "runs")


def add_started_server_flags(group: Any, *, model_name: str) -> None:
    """The flags of the servers a load script starts: model, dtype, extra server.py arguments, cache, patience."""
    group.add_argument("--model-name", default=model_name)
    group.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                       help="the servers' --dtype (auto: theirs, float32 on CPUs and float16 on GPUs)")
    group.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="one more server.py argument for every server (repeatable), e.g. "
                            "--server-arg=--model-instances=8")
    group.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opt-jax"),
                       help="the servers' --cache-dir (compiled programs), also where the tokenizer is looked up")
    group.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds the servers may take to be ready")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default=None,
                        help="an already running server (grpc://host:port for streaming, http://host:port); "
                             "without it this script starts server.py itself")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=None,
                        help="grpc (default): streaming model OPT_stream, TTFT measured; http: model OPT, no TTFT. "
                             "With --server-url, the URL's scheme")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, one request in flight each")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds each client keeps sending")
    parser.add_argument("--requests-per-client", type=int, default=None, help="instead of --duration")
    parser.add_argument("--prompt-range", type=length_range, default=(8, 256), metavar="LOW,HIGH",
                        help="prompt tokens (BOS included), uniform, inclusive")
    parser.add_argument("--output-range", type=length_range, default=(8, 256), metavar="LOW,HIGH",
                        help="output tokens, uniform, inclusive")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (and the baseline's weights)")
    parser.add_argument("--short-prompt", type=int, default=64, help="a short request's most prompt tokens")
    parser.add_argument("--short-output", type=int, default=64, help="a short request's most output tokens")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send ignore_eos=True so that every request generates exactly its output length")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    parser.add_argument("--compare", action="store_true",
                        help="continuous batching vs --one-batch-at-a-time vs the Hugging Face baseline")
    parser.add_argument("--runs", type=run_names, default=list(RUNS), metavar="NAMES",
                        help=f"with --compare, which of {','.join(RUNS)} to run (default: all)")
    server = parser.add_argument_group("servers this script starts")
    add_started_server_flags(server, model_name="random/125M")
    server.add_argument("--number-of-gpus", type=int, default=1)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    if args.requests_per_client is not None and args.requests_per_client < 1:
        parser.error("--requests-per-client must be at least 1")
    if args.compare and args.server_url:
        parser.error("--compare starts its own servers: leave out --server-url")
    if args.server_url:
        scheme = triton_url(args.server_url)[0]
        if args.protocol not in (None, scheme):
            parser.error(f"--protocol {args.protocol} but --server-url is {scheme}://")
        args.protocol = scheme
    args.protocol = args.protocol or "grpc"
    if args.prompt_range[0] < 2:
        parser.error("--prompt-range: a prompt has BOS and at least one word, so LOW >= 2")
    if args.compare and "huggingface" in args.runs and not ({"continuous", "one-batch"} & set(args.runs)) \
            and args.requests_per_client is None:
        parser.error("--runs huggingface alone needs --requests-per-client (no server run to take the requests from)")


def load_settings(args: argparse.Namespace) -> LoadSettings:
    per_client = args.requests_per_client
    return LoadSettings(args.clients, None if per_client else args.duration, per_client, args.timeout)


def mix_settings(args: argparse.Namespace) -> MixSettings:
    return MixSettings(args.seed, tuple(args.prompt_range), tuple(args.output_range))


def short_requests(args: argparse.Namespace) -> ShortRequests:
    return ShortRequests(args.short_prompt, args.short_output)


def log(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


def planned_requests(args: argparse.Namespace, builder: PromptBuilder) -> list[RequestSpec]:
    """The first --requests-per-client requests of every client (the baseline's, when no server ran)."""
    specs = []
    for c in range(args.clients):
        requests = client_requests(c, mix_settings(args), builder)
        specs += [next(requests) for _ in range(args.requests_per_client)]
    return specs


def compare(args: argparse.Namespace, builder: PromptBuilder, config: Any, tokenizer: Any) -> list[Summary]:
    """The selected runs, one after the other, each with the CPU to itself."""
    summaries, issued = [], None
    for name, extra in (("continuous", ()), ("one-batch", ("--one-batch-at-a-time",))):
        if name in args.runs:
            with running_server(args, *extra, name=name) as server:
                summary, run = load_against(args, server_url_for(server, args.protocol), builder, name,
                                            STARTED_MODEL_READY_S, metrics_url_of(server))
            summaries.append(summary)
            issued = issued or [o.spec for o in run.outcomes]
    if "huggingface" in args.runs:
        log("huggingface: transformers OPTForCausalLM (PyTorch) on the same requests")
        summaries.append(hf_baseline(args, issued or planned_requests(args, builder), config, tokenizer))
    return summaries


def measure(args: argparse.Namespace, builder: PromptBuilder, config: Any, tokenizer: Any) -> list[Summary]:
    """--compare's runs, or the load against --server-url, or against one server started here."""
    if args.compare:
        return compare(args, builder, config, tokenizer)
    if args.server_url:
        return [load_against(args, args.server_url, builder, "server", args.ready_timeout)[0]]
    with running_server(args, name="continuous") as server:
        return [load_against(args, server_url_for(server, args.protocol), builder, "continuous",
                             STARTED_MODEL_READY_S, metrics_url_of(server))[0]]


def stop_on_sigterm() -> None:
    """SIGTERM ends this script through SystemExit, so that the servers it started are stopped too."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def prepare_prompts(model_name: str, cache_dir: str, devices: int,
                    say: Callable[[str], None]) -> tuple[Any, Any, PromptBuilder]:
    """(config, tokenizer, prompt builder) of the model, as the servers started from here will see it."""
    # The servers started here read the hub offline (tests/serving.py): the tokenizer here must be theirs.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only tokenizes
    from benchmark import simulate_cpu_devices

    import opt_utils

    simulate_cpu_devices(devices)  # inherited by the servers started here
    config = opt_utils.model_config(model_name, cache_dir)
    tokenizer = opt_utils.load_tokenizer(model_name, None, cache_dir)
    builder = PromptBuilder(tokenizer)
    say(f"tokenizer: {tokenizer.description}; {len(builder.words)} single-token words")
    return config, tokenizer, builder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    config, tokenizer, builder = prepare_prompts(args.model_name, args.cache_dir, args.number_of_gpus, log)
    try:
        summaries = measure(args, builder, config, tokenizer)
    except (TimeoutError, AssertionError) as error:  # a model never ready, a server that exited (its log)
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = report(args, summaries, tokenizer)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
