"""Shared test setup: the repository root on the import path, and JAX on the CPU unless told otherwise."""
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before anything imports jax
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
