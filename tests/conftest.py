"""Strict JAX for every test: no implicit rank or dtype promotion, warnings are errors.

One persistent XLA compilation cache per test run. Many tests build the same optimizer on
the same shapes in fresh closures, which jit's in-memory cache cannot share, and many start
subprocesses that compile the same programs again; the persistent cache is keyed by the
HLO module and compile options, so those compiles are done once (30 % less time on the
core optimizer tests).
The directory is fresh for every run and removed at exit, unless ``JAX_COMPILATION_CACHE_DIR``
is set already; subprocesses inherit it through the environment. An executable read from
it is the one a fresh compile of the same HLO makes, so no result depends on it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lora-muon-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # after the environment above: subprocesses and JAX read it
import pytest

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "error")
