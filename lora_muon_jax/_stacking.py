"""One way to batch many small problems: group equal keys, concatenate, split back.

Used twice: equal-shape factor pairs are stacked into one batch before their
directions are computed (``_lora_muon``), and every r×r matrix function of a
call (inverse roots, polar finishes, certificates) runs in one chain per
(r, dtype, sharding) (``batched``: ``_direction``, ``_robust``). The r×r chains
are what makes the compiled program large (iterations, retries), so batching
them across shapes keeps compile time nearly flat in the number of shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import jax
import jax.numpy as jnp

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

    def split(self, outputs: Sequence[tuple[jax.Array, ...]]) -> list[tuple[jax.Array, ...]]:
        out: list[tuple[jax.Array, ...] | None] = [None] * self._count
        for idx, sizes, result in zip(self._members, self._sizes, outputs, strict=True):
            lo = 0
            for i, n in zip(idx, sizes, strict=True):
                out[i] = tuple(r[lo : lo + n] for r in result) if len(idx) > 1 else tuple(result)
                lo += n
        return [o for o in out if o is not None]


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
