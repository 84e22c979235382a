"""Shared test setup: the repository root on the import path, JAX on the CPU with two simulated devices."""
import os
import sys
from pathlib import Path

import pytest

# Before anything imports jax: CPU unless told otherwise, and two host devices for the sharding tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One --cache-dir for every server of the session, so later starts load their compiled programs."""
    return tmp_path_factory.mktemp("opt-cache")
