"""The stub reaper: a small watcher process that ends Triton's processes if the server is killed outright.

Run as `python reaper.py <server pid>` by `start_reaper`; it imports nothing of the server's.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import psutil

LOGGER = logging.getLogger("server")

STUB_GRACE_S = 5.0  # how long the reaper lets Triton stop by itself after this process is killed
REAPER_TAG = "OPT_SERVER_PID"  # put in this process's environment: Triton and its stubs inherit it


def start_reaper() -> subprocess.Popen:
    """A watcher process that ends Triton's processes if this one is killed outright (kill -9, OOM).

    Triton itself follows this process (PyTriton starts it with a parent-death signal), but its Python
    stubs can hang in their finalize, talking to the dead proxy, and then stay orphaned for good. They
    are found by the environment variable they inherit, whoever their parent is by then.
    """
    os.environ[REAPER_TAG] = str(os.getpid())
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(os.getpid())], stdin=subprocess.DEVNULL)


def stop_reaper(reaper: subprocess.Popen) -> None:
    """Ends the watcher: the server is stopping by itself, Triton already stopped."""
    reaper.kill()
    reaper.wait()
    LOGGER.info("stub reaper stopped")


def reap_when_gone() -> None:
    """The reaper's loop: once the server (argv[1]) is gone, ends the processes that carry its tag."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    server_pid = sys.argv[1]
    watched = _existing_process(int(server_pid))
    while _alive(watched):
        time.sleep(0.5)
    processes = [p for p in psutil.process_iter() if p.pid != os.getpid() and _tag(p) == server_pid]
    folders = stub_model_folders(processes)
    time.sleep(STUB_GRACE_S)
    reap_leftovers(processes, folders)


def _tag(process: psutil.Process) -> str | None:
    try:
        return process.environ().get(REAPER_TAG)
    except psutil.Error:
        return None


def _alive(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _existing_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None



def stub_model_folders(processes: Sequence[psutil.Process]) -> set[Path]:
    """The folder* model copies Triton made for its Python stubs (in the temporary folder: $TMPDIR, else
    /tmp), read off their command lines."""
    prefix = os.path.join(tempfile.gettempdir(), "folder")
    folders: set[Path] = set()
    for process in processes:
        try:
            folders.update(Path(arg).parent.parent for arg in process.cmdline() if arg.startswith(prefix))
        except psutil.Error:
            continue
    return folders


def reap_leftovers(processes: Sequence[psutil.Process], folders: set[Path]) -> None:
    """Ends Triton's processes that outlive the server and removes the stubs' model copies.

    PyTriton 0.7 can leave a stub running (reparented to init) and its /tmp/folder* copy behind.
    """
    _, alive = psutil.wait_procs(processes, timeout=3)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    reap_when_gone()
