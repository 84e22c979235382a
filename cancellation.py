"""Tells the model's callable when Triton cancels its request (a gRPC client stopped its stream).

PyTriton 0.7 drops Triton's cancellation on the floor: the Python-backend stub never asks, and the
callable in this process keeps generating. `install_stub_model()` makes the stubs run `stub_model.py`,
which tags each request with a key (`cancel_key(request)`) and reports cancelled keys as datagrams to a
`CancelListener` in this process, which calls what the callable registered with `watch()`.

Wire format: one datagram per cancelled request on the Unix datagram socket named by $OPT_CANCEL_SOCKET,
its payload the request's key in UTF-8 (f"{stub pid}-{counter}"), nothing else.
"""
from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable

LOGGER = logging.getLogger(__name__)

CANCEL_KEY_PARAMETER = "opt_cancel_key"  # the request parameter stub_model.py sets; keep the two equal
CANCEL_SOCKET_ENV = "OPT_CANCEL_SOCKET"
STUB_MODEL_FILE = pathlib.Path(__file__).with_name("stub_model.py")
PYTRITON_MODEL_FILE = "pytriton_model.py"  # what PyTriton's own model.py is renamed to beside ours
EARLY_KEY_TTL_S = 60.0  # how long a cancel that arrived before its watch() is remembered
MAX_EARLY_KEYS = 10_000


def _with_our_model_file(files: dict[str, bytes], version: int) -> dict[str, bytes]:
    """PyTriton's proxy files as sent to Triton's load API, with model.py renamed and ours in its place."""
    ours = dict(files)
    original = ours.pop(f"file:{version}/model.py")
    ours[f"file:{version}/{PYTRITON_MODEL_FILE}"] = original
    ours[f"file:{version}/model.py"] = STUB_MODEL_FILE.read_bytes()
    return ours


def install_stub_model() -> None:
    """Makes every PyTriton model bound from now on run `stub_model.py` in its stubs. Idempotent.

    PyTriton 0.7's `Triton.run()` sends the files through Triton's load API (`get_proxy_model_files`);
    a local model store (`generate_model`) is patched too, so either lifecycle gets our stub.
    """
    from pytriton.models.model import Model

    if not STUB_MODEL_FILE.is_file():  # else every model load would fail later, less clearly
        raise FileNotFoundError(f"{STUB_MODEL_FILE} is missing: it must be deployed beside {__file__}")
    if getattr(Model.get_proxy_model_files, "_opt_cancellation", False):
        return
    original_files, original_generate = Model.get_proxy_model_files, Model.generate_model

    @functools.wraps(original_files)
    def get_proxy_model_files(self: Model) -> dict[str, bytes]:
        return _with_our_model_file(original_files(self), self.model_version)

    @functools.wraps(original_generate)
    def generate_model(self: Model, model_repository: pathlib.Path) -> None:
        original_generate(self, model_repository)
        folder = model_repository / self.model_name / str(self.model_version)
        (folder / "model.py").replace(folder / PYTRITON_MODEL_FILE)
        shutil.copy(STUB_MODEL_FILE, folder / "model.py")

    get_proxy_model_files._opt_cancellation = True  # type: ignore[attr-defined]
    Model.get_proxy_model_files, Model.generate_model = get_proxy_model_files, generate_model


def cancel_key(request: Any) -> str | None:
    """The key the stub gave this PyTriton Request, or None when its model does not run our stub."""
    key = (getattr(request, "parameters", None) or {}).get(CANCEL_KEY_PARAMETER)
    return key if isinstance(key, str) else None


class CancelListener:
    """Receives the stubs' cancellation reports and calls the callbacks watching those keys.

    Start it before Triton: it sets $OPT_CANCEL_SOCKET, which Triton and its stubs inherit.
    """

    def __init__(self) -> None:
        self._dir = pathlib.Path(tempfile.mkdtemp(prefix="opt-cancel-"))  # mode 0700: only we may report
        self.path = str(self._dir / "cancel.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._lock = threading.Lock()
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._early: dict[str, float] = {}  # key -> monotonic time a cancel came with nobody watching
        self._closed = False
        os.environ[CANCEL_SOCKET_ENV] = self.path
        self._thread = threading.Thread(target=self._receive, name="opt-cancel-listener", daemon=True)
        self._thread.start()

    def __enter__(self) -> CancelListener:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def watch(self, key: str | None, on_cancel: Callable[[], None]) -> Callable[[], None]:
        """Calls `on_cancel` once when `key` is cancelled; returns the function that stops watching.

        `on_cancel` runs on the listener thread (keep it short and thread-safe, e.g. call_soon_threadsafe),
        or at once inside this call when the cancel came first. A None key (a model without our stub)
        watches nothing.
        """
        if key is None:
            return _nothing
        with self._lock:
            early = self._early.pop(key, None) is not None
            if not early:
                self._watchers.setdefault(key, []).append(on_cancel)
        if early:
            _call(on_cancel, key)
        return functools.partial(self._unwatch, key, on_cancel)

    def close(self) -> None:
        """Stops the thread and removes the socket and its directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
                waker.setblocking(False)  # a full queue wakes the thread anyway
                waker.sendto(b"", self.path)  # an empty datagram ends the blocking recv
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        if os.environ.get(CANCEL_SOCKET_ENV) == self.path:
            del os.environ[CANCEL_SOCKET_ENV]

    def _unwatch(self, key: str, on_cancel: Callable[[], None]) -> None:
        with self._lock:
            callbacks = self._watchers.get(key, [])
            if on_cancel in callbacks:
                callbacks.remove(on_cancel)
            if not callbacks:
                self._watchers.pop(key, None)

    def _receive(self) -> None:
        while True:
            try:
                payload = self._sock.recv(4096)
            except OSError as error:
                LOGGER.warning("cancellation listener stopped: %r", error)
                return
            if self._closed:
                return
            if payload:
                self._cancelled(payload.decode("utf-8", errors="replace"))

    def _cancelled(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            callbacks = self._watchers.pop(key, [])
            if not callbacks:
                self._remember(key, now)
        LOGGER.debug("request %s cancelled, %d watching", key, len(callbacks))
        for on_cancel in callbacks:
            _call(on_cancel, key)

    def _remember(self, key: str, now: float) -> None:
        """Keeps a cancel nobody watches yet, for a callable that registers late; old ones expire."""
        while self._early and (len(self._early) >= MAX_EARLY_KEYS
                               or now - next(iter(self._early.values())) > EARLY_KEY_TTL_S):
            del self._early[next(iter(self._early))]  # insertion order is arrival order: oldest first
        self._early[key] = now


def _nothing() -> None:
    pass


def _call(on_cancel: Callable[[], None], key: str) -> None:
    """A failing callback is logged, never allowed to end the listener."""
    try:
        on_cancel()
    except Exception:
        LOGGER.exception("cancellation callback for %s failed", key)
