"""A factor in its own layout <-> the 3-axis views the math runs on.

``to_matrix_view`` gives ``(N, m, r)`` (rank axis last, flax ``lora_a``) or
``(N, r, n)`` flagged rank-first (rank axis first, flax ``lora_b``) without
moving data; any other rank position is moved last. ``to_math_layout`` always
gives ``A (N, m, r)`` / ``B (N, n, r)``. N is the product of the pair's batch
axes. Works on any ``LoRAPair`` (its ``dims``, ``a_shape``, ``b_shape``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from lora_muon_jax._pairs import LoRAPair

Role = Literal["a", "b"]


def rank_axis_of(pair: LoRAPair, role: Role, ndim: int) -> int:
    nb = pair.dims.num_batch_axes or 0
    axis = pair.dims.a_rank_axis if role == "a" else pair.dims.b_rank_axis
    return nb + (axis % (ndim - nb))


def to_matrix_view(x: jax.Array, pair: LoRAPair, role: Role) -> tuple[jax.Array, bool]:
    """A 3-axis view of a factor without moving data when possible.

    Returns ``(view, rank_first)``: ``(N, m, r)`` when the rank axis is the
    factor's last axis (flax ``lora_a``), ``(N, r, n)`` with ``rank_first``
    when it is the first non-batch axis (flax ``lora_b``); any other rank
    position is moved last (a transpose). ``N = prod(batch axes)``.
    """
    nb = pair.dims.num_batch_axes or 0
    rank_axis = rank_axis_of(pair, role, x.ndim)
    batch = math.prod(x.shape[:nb])
    r = x.shape[rank_axis]
    if rank_axis == x.ndim - 1:
        return x.reshape((batch, -1, r)), False
    if rank_axis == nb:
        return x.reshape((batch, r, -1)), True
    return jnp.moveaxis(x, rank_axis, -1).reshape((batch, -1, r)), False


def from_matrix_view(y: jax.Array, pair: LoRAPair, role: Role) -> jax.Array:
    """Inverse of ``to_matrix_view`` (for an array in the view's shape)."""
    shape = pair.a_shape if role == "a" else pair.b_shape
    rank_axis = rank_axis_of(pair, role, len(shape))
    if rank_axis == len(shape) - 1 or rank_axis == (pair.dims.num_batch_axes or 0):
        return y.reshape(shape)
    moved = list(shape)
    r = moved.pop(rank_axis)
    return jnp.moveaxis(y.reshape((*moved, r)), -1, rank_axis)


def to_math_layout(x: jax.Array, pair: LoRAPair, role: Role) -> jax.Array:
    """``lora_a`` -> ``A`` as (N, m, r); ``lora_b`` -> ``B`` as (N, n, r); N = prod(batch)."""
    view, rank_first = to_matrix_view(x, pair, role)
    return jnp.swapaxes(view, -1, -2) if rank_first else view


def math_views(
    leaves: Sequence[jax.Array], pair: LoRAPair, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` of ``pair`` from a tree's leaves, math layout, ``(N, m, r)`` and ``(N, n, r)``."""
    a = to_math_layout(leaves[pair.a_index], pair, "a").astype(dtype)
    b = to_math_layout(leaves[pair.b_index], pair, "b").astype(dtype)
    return a, b


def from_math_layout(y: jax.Array, pair: LoRAPair, role: Role) -> jax.Array:
    """Inverse of ``to_math_layout``."""
    shape = pair.a_shape if role == "a" else pair.b_shape
    rank_axis = rank_axis_of(pair, role, len(shape))
    if rank_axis == (pair.dims.num_batch_axes or 0) and rank_axis != len(shape) - 1:
        return from_matrix_view(jnp.swapaxes(y, -1, -2), pair, role)
    return from_matrix_view(y, pair, role)
