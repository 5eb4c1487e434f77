"""One way to batch many small problems: group equal keys, concatenate, split back.

Used twice: equal-shape factor pairs are stacked into one batch before their
directions are computed (``_lora_muon``), and every r×r matrix function of a
call (inverse roots, polar finishes, certificates) runs in one chain per
(r, dtype, sharding) (``batched``: ``_direction``, ``_robust``). The r×r chains
are what makes the compiled program large (iterations, retries), so batching
them across shapes keeps compile time nearly flat in the number of shapes;
splitting back at runtime offsets keeps it nearly flat in the number of items.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


def sharding_of(x: jax.Array) -> object:
    """The sharding in ``x``'s type on explicit meshes (``None`` elsewhere): part of a key.

    Concatenating differently sharded arrays would gather them (Auto meshes,
    where this is invisible at trace time) or fail (Explicit meshes).
    """
    return getattr(jax.typeof(x), "sharding", None)


class Stacked(Generic[T]):
    """Items grouped by key, each group's arrays concatenated along axis 0.

    ``groups[g]`` is a tuple of concatenated arrays (one per array slot of an
    item) and ``meta[g]`` the first item of the group (for its static fields);
    ``split(outputs)`` takes one tuple of arrays per group (leading axes equal
    to the group's concatenated length) and returns one tuple per item.
    """

    def __init__(
        self,
        items: Sequence[T],
        arrays: Callable[[T], tuple[jax.Array, ...]],
        key: Callable[[T], Hashable],
    ):
        index: dict[Hashable, list[int]] = {}
        for i, item in enumerate(items):
            index.setdefault(key(item), []).append(i)
        self._members = list(index.values())
        self._sizes = [[arrays(items[i])[0].shape[0] for i in idx] for idx in self._members]
        self._count = len(items)
        self.meta = [items[idx[0]] for idx in self._members]
        self.groups = [
            tuple(
                jnp.concatenate(parts, axis=0)
                for parts in zip(*(arrays(items[i]) for i in idx), strict=True)
            )
            if len(idx) > 1
            else arrays(items[idx[0]])
            for idx in self._members
        ]

    def split(
        self, outputs: Sequence[tuple[jax.Array, ...]], anchor: jax.Array | None = None
    ) -> list[tuple[jax.Array, ...]]:
        """One tuple per item, cut at runtime offsets (see ``runtime_offsets``).

        ``anchor`` keys the offsets' sort (default: the group's first output,
        right for r×r results); pass a replicated array where the outputs are
        sharded tall stacks. Where an explicit mesh shards the stacking axis
        itself, the cuts stay static (a runtime one would gather that axis).
        """
        out: list[tuple[jax.Array, ...] | None] = [None] * self._count
        for idx, sizes, result in zip(self._members, self._sizes, outputs, strict=True):
            if len(idx) == 1:
                out[idx[0]] = tuple(result)
                continue
            static = np.cumsum([0, *sizes[:-1]]).tolist()
            starts = (
                static
                if stacked_axis_sharded(result[0])
                else runtime_offsets(result[0] if anchor is None else anchor, static)
            )
            for i, n, start in zip(idx, sizes, starts, strict=True):
                out[i] = tuple(_rows(r, start, n) for r in result)
        return [o for o in out if o is not None]


def _rows(x: jax.Array, start: int | jax.Array, n: int) -> jax.Array:
    if isinstance(start, int):
        return x[start : start + n]
    return jax.lax.dynamic_slice_in_dim(x, start, n, axis=0)


def stacked_axis_sharded(x: jax.Array) -> bool:
    """Axis 0 of ``x`` is sharded in its type (explicit meshes; ``False`` elsewhere)."""
    spec = tuple(getattr(sharding_of(x), "spec", ()))
    return bool(spec) and spec[0] is not None


def replicated_anchor(candidates: Sequence[jax.Array]) -> jax.Array:
    """The first of ``candidates`` (r×r results) whose stacking axis is not sharded.

    Where an explicit mesh shards a stack's batch axis its r×r results are sharded
    too, and slicing two values out of them would need communication (or fail);
    such stacks are cut statically anyway, so any other stack's result keys the
    sort. If every candidate is sharded the anchor goes unused (static cuts only).
    """
    return next((c for c in candidates if not stacked_axis_sharded(c)), candidates[0])


def runtime_offsets(anchor: jax.Array, offsets: Sequence[int]) -> list[jax.Array]:
    """``offsets`` as int32 scalars XLA cannot fold into the kernels that use them.

    A slice at a static offset is a kernel of its own per offset: XLA's CPU
    backend compiles every distinct fusion (~10 ms each on a 2-core VM) and
    identical ones once, so N pairs split back by static slices cost N kernels
    — the per-adapter slope of compile time. A ``dynamic_slice`` whose offset
    is a runtime buffer is the same kernel for every pair. The offsets come out
    of one ``lax.sort`` keyed on two values of ``anchor`` (any runtime array):
    each operand holds its offset twice, so whatever order the key sorts into,
    the values are exact, and XLA cannot constant-fold a sort with a runtime
    key (through ``optimization_barrier`` it forwards constants). At most
    ``_SORT_OPERANDS`` offsets per sort keep each sort kernel small on any
    backend. Measured (2-core CPU): ~2 ms of compile per leaf instead of ~18
    (160 leaves of 512×16); the Llama-shaped 224-adapter step 13 s → 7 s.

    ``anchor`` must be replicated on a mesh (an r×r result is): a sharded one
    would be gathered for its two values.
    """
    flat = anchor.reshape(-1)
    key = jnp.concatenate([flat[:1], flat[-1:]])  # two runtime values
    out: list[jax.Array] = []
    for lo in range(0, len(offsets), _SORT_OPERANDS):  # few operands per sort (GPU kernels)
        chunk = offsets[lo : lo + _SORT_OPERANDS]
        sorted_ = jax.lax.sort((key, *(jnp.full((2,), o, jnp.int32) for o in chunk)), num_keys=1)
        out.extend(o[0] for o in sorted_[1:])
    return out


_SORT_OPERANDS = 16


def batched(
    fn: Callable[..., tuple[jax.Array, ...]], items: Sequence[tuple[jax.Array, ...]]
) -> list[tuple[jax.Array, ...]]:
    """``fn`` on many tuples of (N_i, r, r) stacks: one call per (r, dtype, sharding).

    The key is taken from each item's first array; every array of an item has
    its N_i. ``fn`` takes the concatenated arrays as positional arguments and
    returns arrays with leading axis ΣN_i; the result is split back per item.
    """
    stacked = Stacked(
        items,
        lambda item: item,
        lambda item: (item[0].shape[-1], item[0].dtype, sharding_of(item[0])),
    )
    return stacked.split([fn(*group) for group in stacked.groups])
