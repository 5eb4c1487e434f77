"""A factor in its own layout <-> the 3-axis views the math runs on.

``to_matrix_view`` gives ``(N, m, r)`` (rank axis last, flax ``lora_a``) or
``(N, r, n)`` flagged rank-first (rank axis first after the batch axes, flax
``lora_b``); any other rank position is moved last. ``to_math_layout`` always
gives ``A (N, m, r)`` / ``B (N, n, r)``. N is the product of the pair's batch
axes, which may sit anywhere in each factor (``a_batch_axes``,
``b_batch_axes`` of the resolved ``LoRADimensionNumbers``): they are moved to
the front in their listed order first. Factors whose batch axes already lead
(stacked layers, and every unbatched factor) are reshaped without moving data.
Works on any resolved ``LoRAPair`` (its ``dims``, ``a_shape``, ``b_shape``);
``from_*`` inverts ``to_*`` exactly.
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


def _shape(pair: LoRAPair, role: Role) -> tuple[int, ...]:
    return tuple(pair.a_shape if role == "a" else pair.b_shape)


def batch_axes_of(pair: LoRAPair, role: Role) -> tuple[int, ...]:
    """The batch axes of a factor of ``pair``, as non-negative positions in the factor."""
    ndim = len(_shape(pair, role))
    dims = pair.dims
    axes = dims.a_batch_axes if role == "a" else dims.b_batch_axes
    if axes is None:  # an unresolved spec: leading axes
        return tuple(range(dims.num_batch_axes or 0))
    return tuple(ax % ndim for ax in axes)


def _rest_axes(pair: LoRAPair, role: Role) -> list[int]:
    batch = set(batch_axes_of(pair, role))
    return [ax for ax in range(len(_shape(pair, role))) if ax not in batch]


def rank_axis_of(pair: LoRAPair, role: Role, ndim: int | None = None) -> int:
    """The rank axis of a factor of ``pair``, as a position in the factor itself.

    ``a_rank_axis`` / ``b_rank_axis`` count among the factor's non-batch axes;
    this is the position among all of its axes. ``ndim`` is accepted for
    compatibility and must equal the factor's number of axes.
    """
    rest = _rest_axes(pair, role)
    if ndim is not None and ndim != len(_shape(pair, role)):
        raise ValueError(f"pair {pair.name}: {role} has {len(_shape(pair, role))} axes, not {ndim}")
    axis = pair.dims.a_rank_axis if role == "a" else pair.dims.b_rank_axis
    return rest[(axis if axis is not None else (-1 if role == "a" else 0)) % len(rest)]


def _canonical(pair: LoRAPair, role: Role) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """``(perm, canonical_shape, nb, rank_axis)``: batch axes first, then the rest in order.

    ``rank_axis`` is the rank axis's position in the canonical (permuted) shape.
    """
    shape = _shape(pair, role)
    batch = batch_axes_of(pair, role)
    rest = _rest_axes(pair, role)
    perm = (*batch, *rest)
    rank = rank_axis_of(pair, role)
    return perm, tuple(shape[ax] for ax in perm), len(batch), len(batch) + rest.index(rank)


def _is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))


def to_matrix_view(x: jax.Array, pair: LoRAPair, role: Role) -> tuple[jax.Array, bool]:
    """A 3-axis view of a factor, without moving data when possible.

    Returns ``(view, rank_first)``: ``(N, m, r)`` when the rank axis is the
    factor's last axis (flax ``lora_a``), ``(N, r, n)`` with ``rank_first``
    when it is the first non-batch axis (flax ``lora_b``); any other rank
    position is moved last (a transpose). ``N = prod(batch axes)``; batch axes
    that do not lead are moved to the front first (a transpose).
    """
    perm, shape, nb, rank_axis = _canonical(pair, role)
    if not _is_identity(perm):
        x = jnp.transpose(x, perm)
    batch = math.prod(shape[:nb])
    r = shape[rank_axis]
    if rank_axis == len(shape) - 1:
        return x.reshape((batch, -1, r)), False
    if rank_axis == nb:
        return x.reshape((batch, r, -1)), True
    return jnp.moveaxis(x, rank_axis, -1).reshape((batch, -1, r)), False


def from_matrix_view(y: jax.Array, pair: LoRAPair, role: Role) -> jax.Array:
    """Inverse of ``to_matrix_view`` (for an array in the view's shape)."""
    perm, shape, nb, rank_axis = _canonical(pair, role)
    if rank_axis == len(shape) - 1 or rank_axis == nb:
        x = y.reshape(shape)
    else:
        moved = list(shape)
        r = moved.pop(rank_axis)
        x = jnp.moveaxis(y.reshape((*moved, r)), -1, rank_axis)
    if _is_identity(perm):
        return x
    inverse = [0] * len(perm)
    for i, ax in enumerate(perm):
        inverse[ax] = i
    return jnp.transpose(x, inverse)


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
    _, shape, nb, rank_axis = _canonical(pair, role)
    if rank_axis == nb and rank_axis != len(shape) - 1:
        return from_matrix_view(jnp.swapaxes(y, -1, -2), pair, role)
    return from_matrix_view(y, pair, role)
