"""Sends one prompt to POST /v1/completions of the server's OpenAI-compatible API; exits 0 only on a completion.

The test chart's Job and its `helm test` pod run it after client.py (the chart mounts it from a ConfigMap):

    python3 openai_completion.py --url http://jax-example-service:9000 --prompt "The capital of Poland is"

Each flag's default comes from the environment, which the chart sets: OPT_OPENAI_URL, OPT_OPENAI_MODEL,
OPT_OPENAI_PROMPT, OPT_OPENAI_MAX_TOKENS, OPT_OPENAI_TIMEOUT. The API key comes from OPT_SERVER_API_KEY only (a
flag's value would show in ps) and is sent as `Authorization: Bearer <key>`. With no model given, the request names
the first model GET /v1/models lists. A refused connection or a 503 (the server starting or draining) is tried
again until --timeout has passed; any other failure, or an answer that is not a completion, ends it at once with
exit status 1. Only the standard library: the server image, where this runs, has python3 and no curl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

RETRY_AFTER_S = 2.0
API_KEY_ENV = "OPT_SERVER_API_KEY"  # the variable server.py reads its --api-key from


class Failed(Exception):
    """The API did not give a completion; the message says what came back instead."""


def request(url: str, *, body: dict[str, Any] | None, key: str | None, deadline: float) -> Any:
    """The JSON answer of GET url (POST when `body` is given), retrying a refused connection or a 503 until
    `deadline` (time.monotonic())."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    while True:
        left = deadline - time.monotonic()
        try:
            call = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            with urllib.request.urlopen(call, timeout=max(left, 1.0)) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            answer = error.read().decode(errors="replace")
            if error.code != 503 or left <= RETRY_AFTER_S:
                raise Failed(f"{url}: HTTP {error.code} {answer}") from None
            print(f"{url}: HTTP 503 {answer}; trying again", file=sys.stderr)
        except TimeoutError:
            raise Failed(f"{url}: no answer within {max(left, 1.0):.0f} s") from None
        except (urllib.error.URLError, ConnectionError) as error:  # refused, reset, no such host yet
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError) or left <= RETRY_AFTER_S:
                raise Failed(f"{url}: {reason}") from None
            print(f"{url}: {reason}; trying again", file=sys.stderr)
        except ValueError as error:
            raise Failed(f"{url}: the answer is not JSON: {error}") from None
        time.sleep(RETRY_AFTER_S)


def first_model(base: str, *, key: str | None, deadline: float) -> str:
    answer = request(f"{base}/v1/models", body=None, key=key, deadline=deadline)
    try:
        return str(answer["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise Failed(f"{base}/v1/models lists no model: {json.dumps(answer)}") from None


def completion_text(answer: Any) -> str:
    """The generated text of an OpenAI text completion; Failed unless `answer` is one."""
    if not isinstance(answer, dict) or answer.get("object") != "text_completion":
        raise Failed(f"the answer is not a text completion: {json.dumps(answer)}")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise Failed(f"the completion has no choices: {json.dumps(answer)}")
    if not isinstance(choices[0].get("text"), str) or choices[0].get("finish_reason") not in ("stop", "length"):
        raise Failed(f"the completion's first choice has no text or no finish_reason: {json.dumps(answer)}")
    return choices[0]["text"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=env("OPT_OPENAI_URL"),
                        help="the API's address, http://host:port (OPT_OPENAI_URL)")
    parser.add_argument("--model", default=env("OPT_OPENAI_MODEL") or None,
                        help="the request's model (OPT_OPENAI_MODEL); default: the first of GET /v1/models")
    parser.add_argument("--prompt", default=env("OPT_OPENAI_PROMPT", "The capital of Poland is"),
                        help="the prompt (OPT_OPENAI_PROMPT)")
    parser.add_argument("--max-tokens", type=int, default=int(env("OPT_OPENAI_MAX_TOKENS", "16")),
                        help="tokens to generate (OPT_OPENAI_MAX_TOKENS)")
    parser.add_argument("--timeout", type=float, default=float(env("OPT_OPENAI_TIMEOUT", "120")),
                        help="seconds to wait for the server and its answer (OPT_OPENAI_TIMEOUT)")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("give the API's address: --url http://host:port, or OPT_OPENAI_URL")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base, key = args.url.rstrip("/"), os.environ.get(API_KEY_ENV) or None
    deadline = time.monotonic() + args.timeout
    try:
        model = args.model or first_model(base, key=key, deadline=deadline)
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens}
        text = completion_text(request(f"{base}/v1/completions", body=body, key=key, deadline=deadline))
    except Failed as error:
        print(f"openai_completion.py: {error}", file=sys.stderr)
        return 1
    print(f"completion ({model}): {args.prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
