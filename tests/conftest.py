"""Strict JAX for every test: no implicit rank or dtype promotion, warnings are errors."""

from __future__ import annotations

import pathlib
import sys

import jax
import pytest

# The package is not installed into the venv (there is no pyproject.toml yet), so
# make the checkout importable when pytest is run as `.venv/bin/pytest tests/...`.
_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "error")
