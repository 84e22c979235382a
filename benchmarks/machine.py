"""What the numbers depend on: the CPU's model name, its core count and its instruction-set flags.

Read from /proc/cpuinfo by every benchmark that records the machine beside its numbers; stdlib only, so that
it also runs in the peers' own venvs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Cpu:
    model: str | None  # the first "model name" line
    logical_cpus: int  # "processor" entries, as /proc/cpuinfo lists them
    flags: frozenset[str]


def read_cpu(path: Path = Path("/proc/cpuinfo")) -> Cpu:
    """The machine's CPU; OSError where cpuinfo cannot be read (each caller says what it records then)."""
    lines = path.read_text(errors="replace").splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return Cpu(models[0] if models else None, len(models), frozenset(flags))


UNKNOWN_CPU = Cpu(None, 0, frozenset())
