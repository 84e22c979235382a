"""Compiled programs kept under `--cache-dir`, so that a restart loads them instead of tracing and compiling.

jax's own persistent compilation cache skips XLA's compile but still traces and lowers every program
(about 0.5 s each for random/125M's whole-model programs, holding the GIL). This cache stores the
compiled executable itself (jax's `serialize_executable` payload) and loads it without tracing anything.
It replaces jax's cache rather than sitting beside it: an XLA:CPU executable that jax loaded from its
own cache and we serialized again failed to run once loaded ("Function broadcast.5_kernel not found").

Layout, under `<cache-dir>/programs/`:

    <fingerprint>/key.json        what the programs were built from (see `program_key`)
    <fingerprint>/<name>.program  one program: a header line (JSON) and the payload

The fingerprint hashes the whole key, so a change in anything that changes a program (jax or jaxlib,
the device kind and mesh, this rank's devices, the model config, dtype, shapes, XLA flags or our own
source) selects another folder: a stale program never loads. When a folder is new, the log says which
fields differ from the nearest stored key. The header names the fingerprint and program and holds the
payload's SHA-256: a corrupt, truncated or misplaced entry is reported and compiled again.

The payload is a pickle (of jax's executable wrapper). It is read with an unpickler that resolves only
jax's own classes and a few numpy ones, so a foreign file cannot name arbitrary code.

Entries are written to a temporary file and renamed into place: several ranks or replicas sharing one
volume (a StatefulSet's claim) never see half an entry, and two writers of one entry write the same bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

LOGGER = logging.getLogger("program_cache")

FORMAT = 1  # of the header and payload; part of the key
KEY_FILE = "key.json"
SUFFIX = ".program"
OWN_SOURCES = ("modeling_flax_opt.py", "plan.py", "slots.py", "sharding.py", "weights.py", "runner.py",
               "program_cache.py")  # what our programs are made of

# The globals a jax executable's pickle names (jax 0.7): jax's own classes and helpers, and numpy's array
# and dtype reconstruction, OrderedDict. Anything else in a payload makes it foreign.
_ALLOWED_PREFIXES = ("jax._src.", "jaxlib.")
_ALLOWED_OTHERS = {("collections", "OrderedDict"), ("numpy", "dtype"), ("numpy", "ndarray"),
                   ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


class ForeignPayload(Exception):
    """A payload that names something other than jax's and numpy's own classes."""


def source_digest(folder: Path, names: tuple[str, ...] = OWN_SOURCES) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def program_key(*, mesh: Any, config: Any, dtype: Any, shapes: Any) -> dict[str, str]:
    """Everything a compiled program depends on, as strings (the fingerprint hashes them)."""
    import jaxlib

    devices = list(mesh.devices.flat)
    client = devices[0].client
    return {
        "format": str(FORMAT),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": f"{client.platform} {client.platform_version}",
        "device_kind": ",".join(sorted({d.device_kind for d in devices})),
        "mesh": f"{dict(mesh.shape)} " + " ".join(f"{d.process_index}:{d.id}" for d in devices),
        "process": f"{jax.process_index()} of {jax.process_count()}",
        "config": repr(config),
        "dtype": str(dtype),
        "shapes": repr(shapes),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": str(jax.config.jax_enable_x64),
        "source": source_digest(Path(__file__).resolve().parent),
    }


def fingerprint(key: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:24]


def write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _unpickler(data: bytes, backend: Any, devices: Any) -> Any:
    from jax.experimental import serialize_executable

    class Restricted(serialize_executable._JaxPjrtUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.startswith(_ALLOWED_PREFIXES) or (module, name) in _ALLOWED_OTHERS:
                return super().find_class(module, name)
            raise ForeignPayload(f"the payload names {module}.{name}")

    return Restricted(io.BytesIO(data), backend, devices)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One program to build: its lookup key, the function, abstract arguments and output shardings."""

    key: tuple[Any, ...]
    fn: Callable[..., Any]
    args: tuple[Any, ...]  # jax.ShapeDtypeStruct trees, each with its sharding
    out_shardings: Any  # a tree shaped like the function's result
    donate: tuple[int, ...] = ()
    keep_unused: bool = False

    @property
    def name(self) -> str:
        return "-".join(str(part).lower() for part in self.key)


@dataclasses.dataclass
class Stats:
    """What one start-up spent on programs (seconds summed over threads)."""

    loaded: int = 0
    compiled: int = 0
    load_s: float = 0.0
    trace_s: float = 0.0  # tracing and lowering
    compile_s: float = 0.0
    store_s: float = 0.0


class ProgramCache:
    """Compiled programs of one configuration (one key) under a folder; `folder` None keeps nothing."""

    def __init__(self, root: Path | None, key: Mapping[str, str], devices: Any):
        self.key = dict(key)
        self.fingerprint = fingerprint(key)
        self.devices = devices  # the mesh's devices, in its order: an executable's device assignment
        self.folder = root / self.fingerprint if root else None
        self.stats = Stats()
        self._lock = threading.Lock()  # the stats, from the threads that build programs
        if self.folder:
            self._open(root)

    @classmethod
    def in_memory(cls, mesh: Any) -> "ProgramCache":
        """Programs compiled for `mesh` and kept nowhere (no --cache-dir)."""
        return cls(None, {}, list(mesh.devices.flat))

    @classmethod
    def under(cls, cache_dir: str | None, *, mesh: Any, config: Any, dtype: Any, shapes: Any) -> "ProgramCache":
        """The programs of this configuration under `cache_dir` (None: kept in memory only)."""
        key = program_key(mesh=mesh, config=config, dtype=dtype, shapes=shapes)
        return cls(Path(cache_dir) / "programs" if cache_dir else None, key, list(mesh.devices.flat))

    def _open(self, root: Path) -> None:
        assert self.folder
        if (self.folder / KEY_FILE).exists():
            LOGGER.info("compiled programs: loading from %s", self.folder)
            return
        LOGGER.info("compiled programs: none stored for this configuration (%s); %s", self.folder,
                    self._why_new(root))
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / KEY_FILE, json.dumps(self.key, indent=1, sort_keys=True).encode())

    def _why_new(self, root: Path) -> str:
        """Which fields differ from the most recently stored key that shares the most fields with this one."""
        stored = []
        for path in root.glob(f"*/{KEY_FILE}"):
            try:
                stored.append((json.loads(path.read_text()), path.stat().st_mtime))
            except (OSError, ValueError):
                continue
        if not stored:
            return "the cache is empty: compiling them"
        same = lambda other: sum(other.get(k) == v for k, v in self.key.items())
        nearest, _ = max(stored, key=lambda item: (same(item[0]), item[1]))
        changed = [f"{k} {nearest.get(k)!r} -> {v!r}" if k not in ("config", "shapes", "mesh") else k
                   for k, v in self.key.items() if nearest.get(k) != v]
        return "compiling them; the nearest stored set differs in " + "; ".join(changed)

    # -- one program ------------------------------------------------------------------------------
    def build(self, spec: ProgramSpec) -> Any:
        """The compiled program of `spec`: loaded when stored, else traced, compiled and stored."""
        in_tree = jax.tree_util.tree_structure((spec.args, {}))
        out_tree = jax.tree_util.tree_structure(spec.out_shardings,
                                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        compiled = self.load(spec.name, in_tree, out_tree)
        if compiled is not None:
            return compiled
        begin = time.perf_counter()
        lowered = jax.jit(spec.fn, donate_argnums=spec.donate, keep_unused=spec.keep_unused,
                          out_shardings=spec.out_shardings).lower(*spec.args)
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        if (compiled.in_tree, compiled.out_tree) != (in_tree, out_tree):
            raise RuntimeError(f"program {spec.name}: its argument or result structure differs from its spec, "
                               "so a stored copy could not be loaded")
        self.store(spec.name, compiled)
        LOGGER.debug("compiled program %s: tracing %.2f s, compiling %.2f s", spec.name, traced - begin, done - traced)
        with self._lock:
            self.stats.compiled += 1
            self.stats.trace_s += traced - begin
            self.stats.compile_s += done - traced
        return compiled

    def _path(self, name: str) -> Path:
        assert self.folder
        return self.folder / (name + SUFFIX)

    def load(self, name: str, in_tree: Any, out_tree: Any) -> Any | None:
        """The stored program `name`, or None (not stored, or unusable: then the log says why)."""
        if not self.folder:
            return None
        path = self._path(name)
        begin = time.perf_counter()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            compiled = self._decode(name, data, in_tree, out_tree)
        except Exception as error:  # corrupt, truncated, foreign or from another jax: never run it
            LOGGER.warning("compiled program %s in %s is unusable (%s: %s): compiling it again", name, path,
                           type(error).__name__, error)
            return None
        with self._lock:
            self.stats.loaded += 1
            self.stats.load_s += time.perf_counter() - begin
        return compiled

    def _decode(self, name: str, data: bytes, in_tree: Any, out_tree: Any) -> Any:
        line, _, payload = data.partition(b"\n")
        header = json.loads(line)
        if header.get("fingerprint") != self.fingerprint or header.get("name") != name:
            raise ForeignPayload(f"the entry is {header.get('name')!r} of {header.get('fingerprint')!r}")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256") or len(payload) != header.get("bytes"):
            raise ValueError("the payload does not match its checksum (truncated or corrupt)")
        backend = self.devices[0].client
        unloaded, args_info_flat, no_kwargs = _unpickler(payload, backend, self.devices).load()
        args_info = in_tree.unflatten(args_info_flat)
        return jax.stages.Compiled(unloaded.load(), [], args_info, out_tree, no_kwargs=no_kwargs)

    def store(self, name: str, compiled: Any) -> None:
        if not self.folder:
            return
        from jax.experimental import serialize_executable

        begin = time.perf_counter()
        try:
            payload, _, _ = serialize_executable.serialize(compiled)
        except (ValueError, NotImplementedError) as error:  # a backend that cannot serialize: compile each time
            LOGGER.warning("compiled program %s cannot be stored: %s", name, error)
            return
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "name": name,
                  "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        try:
            write_atomically(self._path(name), json.dumps(header).encode() + b"\n" + payload)
        except OSError as error:  # a full or read-only volume costs the next start its time, nothing more
            LOGGER.warning("compiled program %s not stored in %s: %s", name, self.folder, error)
        with self._lock:
            self.stats.store_s += time.perf_counter() - begin
