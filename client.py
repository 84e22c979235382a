#!/usr/bin/env python3
"""Sends a prompt to the Triton model `OPT` and prints the prompt followed by the generated text.

    python client.py --server-url http://localhost:8000 --input "The capital of Poland is" --output-length 16

The URL's scheme picks the protocol: http:// (port 8000 by default) or grpc:// (port 8001).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np

MODEL_NAME = "OPT"
LOGGER = logging.getLogger("client")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default="http://localhost:8000", help="http://host:port or grpc://host:port")
    parser.add_argument("--input", default="The capital of Poland is", help="the prompt")
    parser.add_argument("--output-length", type=int, default=16, help="how many tokens to generate")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server and the answer")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def triton_url(server_url: str) -> tuple[str, str]:
    """(protocol, host:port) from http://..., grpc://... or a bare host:port (HTTP)."""
    parsed = urlparse(server_url if "://" in server_url else f"http://{server_url}")
    if parsed.scheme not in ("http", "grpc"):
        raise SystemExit(f"--server-url scheme must be http or grpc, got {parsed.scheme!r}")
    port = parsed.port or (8000 if parsed.scheme == "http" else 8001)
    return parsed.scheme, f"{parsed.hostname}:{port}"


def infer(server_url: str, prompts: Sequence[str], output_lengths: Sequence[int], timeout: float) -> list[str]:
    """One Triton request with one row per prompt; returns the decoded outputs."""
    protocol, address = triton_url(server_url)
    if protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    inputs = request_inputs(triton, [p.encode("utf-8") for p in prompts], output_lengths)
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


def request_inputs(triton: Any, prompts: Sequence[bytes], output_lengths: Sequence[int]) -> list[Any]:
    """The model's two inputs for `tritonclient.http` or `tritonclient.grpc` (the module `triton`)."""
    prompt_array = np.array([[p] for p in prompts], dtype=object)  # [B, 1] bytes
    length_array = np.array([[n] for n in output_lengths], dtype=np.int64)  # [B, 1]
    inputs = [triton.InferInput("input", list(prompt_array.shape), "BYTES"),
              triton.InferInput("output_length", list(length_array.shape), "INT64")]
    inputs[0].set_data_from_numpy(prompt_array)
    inputs[1].set_data_from_numpy(length_array)
    return inputs


def wait_until_ready(client: Any, timeout: float) -> None:
    """Waits for the model to be ready (a server still loading or warming up), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.is_model_ready(MODEL_NAME):
                return
        except Exception as error:  # not listening yet
            LOGGER.debug("server not ready: %s", error)
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {MODEL_NAME!r} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def server_error(message: str, verbose: bool) -> str:
    """The problem the server named: PyTriton wraps it in the server's traceback, which --verbose keeps."""
    named = re.findall(r"PyTriton\w*Error: (.+)", message)
    return message if verbose or not named else named[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tritonclient.utils import InferenceServerException

    try:
        outputs = infer(args.server_url, [args.input], [args.output_length], args.timeout)
    except InferenceServerException as error:
        print(f"error: {server_error(error.message() or str(error), args.verbose)}", file=sys.stderr)
        return 1
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"output: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
