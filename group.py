"""The multi-node group: one jax.distributed process per node. Joining, heartbeats, lost peers, leaving."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from channel import KEY_PREFIX, Channel, GroupError, await_key

LOGGER = logging.getLogger("server")


class GroupFlags(Protocol):
    """The flags a rank joins the group with (server.ServerConfig has them)."""

    head_url: str
    number_of_nodes: int
    rank: int
    number_of_gpus: int
    join_timeout: float
    peer_timeout: float
    health_file: str | None
    coordinator_bind_address: str | None

JOIN_GRACE_S = 30  # jax's own connect timeout runs this much past --join-timeout, so ours fires first
HEARTBEAT_INTERVAL_S = 1.0
EXIT_GRACE_S = 15.0  # after a lost peer, the most a rank spends stopping before it exits regardless


class PeerMonitor:
    """Heartbeats through the key-value store: a rank whose heartbeat stops for `timeout` seconds is lost.

    Keys under opt-server/peers/: `heartbeat/<rank>` (a counter each rank bumps every second),
    `leaving/<rank>` (why a worker stopped), `draining/<rank>` (a worker got SIGTERM and asks rank 0 to
    drain the group), `ended` (why rank 0 ended the group on a failure) and `stopped` (rank 0 was
    stopped before serving). Rank 0 watches every worker; a worker watches rank 0,
    whose process also holds the key-value store, so a dead rank 0 shows as the store not answering.
    `on_lost(message, status)` gets a message naming the lost rank and the exit status it calls for.
    """

    def __init__(self, client: Any, *, rank: int, size: int, timeout: float,
                 on_lost: Callable[[str, int], None], health_file: str | None = None):
        self._client = client
        self._rank = rank
        self._watched = list(range(1, size)) if rank == 0 else [0]
        self.timeout = timeout
        self._on_lost = on_lost
        self._health_file = Path(health_file) if health_file else None
        self.ready = threading.Event()  # set by a worker once it can run batches: then the file is touched
        self._seen: dict[int, tuple[str | None, float]] = {}  # rank -> (last heartbeat, when it last changed)
        self._unreachable_since: float | None = None
        self._finished = threading.Event()
        self.lost: str | None = None
        self.lost_event = threading.Event()
        self.drain_requested: str | None = None  # rank 0: why a worker asked the group to drain
        self._thread = threading.Thread(target=self._run, name="peer-monitor", daemon=True)

    def _key(self, name: str) -> str:
        return f"{KEY_PREFIX}peers/{name}"

    def start(self) -> None:
        now = time.monotonic()
        self._seen = {rank: (None, now) for rank in self._watched}
        self._thread.start()

    def stop(self) -> None:
        self._finished.set()

    def wait_lost(self, timeout: float) -> str | None:
        self.lost_event.wait(timeout)
        return self.lost

    def leave(self, reason: str, *, failed: bool) -> None:
        """This rank stops: rank 0 hears why a worker left; workers hear whether rank 0 stopped or failed."""
        self._finished.set()
        name = ("ended" if failed else "stopped") if self._rank == 0 else f"leaving/{self._rank}"
        try:
            self._client.key_value_set(self._key(name), reason, allow_overwrite=True)
        except Exception as error:  # the store is gone with rank 0: nobody is left to tell
            LOGGER.debug("could not announce leaving: %s", error)

    def request_drain(self, reason: str) -> None:
        """A worker: asks rank 0 to stop taking requests, finish those in flight and stop the group."""
        try:
            self._client.key_value_set(self._key(f"draining/{self._rank}"), reason, allow_overwrite=True)
        except Exception as error:  # the store is gone with rank 0: the monitor ends this rank
            LOGGER.debug("could not ask for a drain: %s", error)

    def _run(self) -> None:
        beat = 0
        while not self._finished.wait(HEARTBEAT_INTERVAL_S):
            beat += 1
            problem = self._check(beat)
            if problem and not self._finished.is_set():
                self.lost, status = problem
                self.lost_event.set()
                if self._rank == 0:  # the other workers hear it from the store, not from jax's abort
                    self.leave(self.lost, failed=True)
                self._on_lost(self.lost, status)
                return
            if self._health_file and self.ready.is_set():
                self._health_file.touch()

    def _check(self, beat: int) -> tuple[str, int] | None:
        now = time.monotonic()
        try:
            self._client.key_value_set(self._key(f"heartbeat/{self._rank}"), str(beat), allow_overwrite=True)
            entries = dict(self._client.key_value_dir_get(self._key("")))
        except Exception as error:
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since >= self.timeout:
                return (f"lost rank 0: its key-value store has not answered for {self.timeout:g} s "
                        f"({str(error).splitlines()[0]})"), 1
            return None
        self._unreachable_since = None
        if self._rank and (reason := entries.get(self._key("ended"))):
            return f"rank 0 ended the group: {reason}", 1
        if self._rank and (reason := entries.get(self._key("stopped"))):
            return f"rank 0 stopped the group: {reason}", 0
        if not self._rank and self.drain_requested is None:
            self.drain_requested = next((f"rank {rank} asked for a drain ({reason})" for rank in self._watched
                                         if (reason := entries.get(self._key(f"draining/{rank}")))), None)
        lost = self._stale_or_leaving(entries, now)
        return (lost, 1) if lost else None

    def _stale_or_leaving(self, entries: dict[str, str], now: float) -> str | None:
        for rank in self._watched:
            if reason := entries.get(self._key(f"leaving/{rank}")):
                return f"lost rank {rank}: it left the group ({reason})"
            beat, since = self._seen[rank]
            current = entries.get(self._key(f"heartbeat/{rank}"))
            if current != beat:
                self._seen[rank] = (current, now)
            elif now - since >= self.timeout:
                return f"lost rank {rank}: no heartbeat for {now - since:.0f} s"
        return None


@dataclasses.dataclass
class Group:
    """This process's place in a multi-node group."""

    rank: int
    size: int
    client: Any  # jax.distributed's client: the key-value store of the coordination service
    channel: Channel
    monitor: PeerMonitor
    stopped_by_rank_0: bool = False  # a worker got rank 0's stop: every rank is leaving together
    abort_hook: Any = None  # a worker's SIGABRT handler (a ctypes callback): it must live as long as the process

    def announce_ready(self) -> None:
        """A worker has its weights and programs: rank 0 may start taking requests."""
        self.client.key_value_set(f"{KEY_PREFIX}ready/{self.rank}", socket.gethostname())
        self.monitor.ready.set()

    def wait_until_ready(self) -> None:
        """Rank 0: blocks until every worker has its weights and programs (a signal still interrupts)."""
        for rank in range(1, self.size):
            LOGGER.info("waiting for rank %d to finish loading and compiling", rank)
            await_key(self.client, f"{KEY_PREFIX}ready/{rank}")  # a lost worker ends this process from the monitor
        LOGGER.info("all %d ranks are ready", self.size)


def join_group(args: GroupFlags, *, serving: threading.Event,
               take_signals_back: Callable[[], None]) -> Group:
    """Joins rank 0's jax.distributed group, waiting up to --join-timeout for every rank to come.

    jax's connect blocks until all ranks have registered and then ends the process without saying who
    was missing, so it runs in a thread while this one keeps the signals working, has each rank sign in
    to the key-value store (which answers before the group is complete) and names the missing ranks.
    `serving` is set once this rank serves (a lost peer then winds it down instead of ending it);
    `take_signals_back` reinstalls the server's signal handlers, which jax's preemption notifier takes.
    """
    import jax
    from jax._src import distributed  # the client of jax.distributed: its key-value store is our channel

    failures: list[BaseException] = []
    connect = threading.Thread(target=_initialize_distributed, args=(args, failures), name="join", daemon=True)
    connect.start()
    deadline = time.monotonic() + args.join_timeout
    signed_in = False
    LOGGER.info("rank %d of %d: joining the group at %s", args.rank, args.number_of_nodes, args.head_url)
    while connect.is_alive():
        client = distributed.global_state.client
        if client is not None and not signed_in:
            signed_in = _try(lambda: client.key_value_set(f"{KEY_PREFIX}joined/{args.rank}", socket.gethostname()))
        if time.monotonic() > deadline:
            raise GroupError(f"gave up after {args.join_timeout:g} s (--join-timeout): {_never_joined(client, args)}")
        connect.join(0.5)
    if failures:
        raise GroupError(f"could not join the group at {args.head_url}: {failures[0]}")
    take_signals_back()  # jax's preemption notifier took SIGTERM over
    abort_hook = report_abort_as_lost_rank_0(args.rank, args.head_url) if args.rank else None
    LOGGER.info("joined: %d ranks, %d devices in all", jax.process_count(), jax.device_count())
    client = distributed.global_state.client
    monitor = PeerMonitor(client, rank=args.rank, size=args.number_of_nodes, timeout=args.peer_timeout,
                          on_lost=lambda reason, status: on_peer_lost(args.rank, reason, status, serving),
                          health_file=args.health_file)
    monitor.start()
    return Group(args.rank, args.number_of_nodes, client, Channel(client), monitor, abort_hook=abort_hook)


def _initialize_distributed(args: GroupFlags, failures: list[BaseException]) -> None:
    import jax

    bind = None  # jax's default: every interface ([::]) at the port of --head-url
    if args.coordinator_bind_address:
        host = args.coordinator_bind_address
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        bind = f"{host}:{args.head_url.rsplit(':', 1)[1]}"
    try:
        jax.distributed.initialize(
            coordinator_address=args.head_url, num_processes=args.number_of_nodes, process_id=args.rank,
            local_device_ids=list(range(args.number_of_gpus)),
            initialization_timeout=int(args.join_timeout) + JOIN_GRACE_S, coordinator_bind_address=bind,
        )
    except BaseException as error:
        failures.append(error)


def _try(action: Callable[[], Any]) -> bool:
    try:
        action()
        return True
    except Exception:
        return False


def _never_joined(client: Any, args: GroupFlags) -> str:
    """Which ranks never signed in, read from the key-value store; or that rank 0's store never answered."""
    try:
        entries = client.key_value_dir_get(f"{KEY_PREFIX}joined/") if client is not None else None
    except Exception:
        entries = None
    if entries is None:
        return f"rank 0 never came: nothing answered at --head-url {args.head_url}"
    joined = {int(key.rsplit("/", 1)[1]) for key, _ in entries}
    missing = sorted(set(range(args.number_of_nodes)) - joined)
    return f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never joined"


def report_abort_as_lost_rank_0(rank: int, head_url: str) -> Any:
    """Workers: turns jax's abort on a vanished rank 0 into our log line and exit status 1.

    jax's coordination client polls rank 0's service; the moment that fails it ends the process with
    abort() from a C++ thread (its Python callback hook cannot be used: it fails with std::bad_cast), so
    this C-level SIGABRT handler names the cause and exits 1. It runs inside a signal handler, so it does
    the least it can: one write of a message made beforehand and _exit; no socket, sleep, lock or logging.
    """
    import ctypes

    message = (f"rank {rank} ERROR {LOGGER.name}: lost rank 0: its coordination service at {head_url} stopped "
               "answering, or reported another rank lost (jax's fatal error above says which); ending this "
               "rank\n").encode()

    def on_abort(_signum: int) -> None:
        os.write(2, message)
        os._exit(1)

    handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
    return handler  # the caller keeps it: freed, the callback would crash the abort it handles


def on_peer_lost(rank: int, reason: str, status: int, serving: threading.Event) -> None:
    """The monitor's verdict: a worker exits at once; rank 0 fails its requests and stops Triton first."""
    LOGGER.log(logging.ERROR if status else logging.INFO, "%s; ending this rank", reason)
    threading.Timer(EXIT_GRACE_S, exit_now, args=(1,)).start()  # whatever stopping does, it ends in time
    if rank == 0 and not serving.is_set():
        let_workers_read_why()
    if rank != 0 or not serving.is_set():
        exit_now(status)
    # rank 0 while serving: wait_for_stop sees monitor.lost within a second and stops Triton


def let_workers_read_why() -> None:
    """Rank 0, before exiting on its own: the store goes with this process, so give the workers' monitors
    two heartbeats to read `ended` or `stopped` rather than learn of it from jax's abort."""
    time.sleep(2 * HEARTBEAT_INTERVAL_S)


def exit_now(status: int) -> None:
    """Ends the process without Python's exit handlers: jax's would wait on peers that may be gone."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def leave_group(group: Group | None, status: int, *, clean: bool) -> int:
    """Ends this rank's part in the group. `clean`: every rank is stopping together, so jax's shutdown
    barrier completes; otherwise the peers may be gone and the process exits without waiting for them."""
    if group is None:
        return status
    group.monitor.stop()
    if group.rank == 0 and not clean:
        let_workers_read_why()
    if clean:
        import jax

        done = threading.Thread(target=jax.distributed.shutdown, name="shutdown", daemon=True)
        done.start()
        done.join(EXIT_GRACE_S)
    exit_now(status)
    return status
