"""Helpers of the NNX LoRA layers: initializers on flattened shapes, metadata, flax's names."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def flat_init(init: Initializer, flat_shape: tuple[int, ...]) -> Initializer:
    """Call ``init`` on a 2-D shape (fans = flattened sizes), reshape to the full shape."""

    def wrapped(rng: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.reshape(init(rng, flat_shape, dtype), tuple(shape))

    return wrapped


def sharding_metadata(
    names: Sequence[str | None] | None,
    extra: Mapping[str, Any] | None = None,
    lora_scale: float | None = None,
) -> dict[str, Any]:
    """Variable metadata: ``out_sharding`` from ``names``, a factor's declared
    ``lora_scale`` (read by ``lora_muon`` at ``init``), then ``extra``."""
    out: dict[str, Any] = {} if names is None else {"out_sharding": tuple(names)}
    if lora_scale is not None:
        out["lora_scale"] = float(lora_scale)
    return {**out, **dict(extra or {})}


_OLD_ARGUMENTS = {
    "rank": "lora_rank",
    "lora_a_init": "a_initializer",
    "lora_b_init": "b_initializer",
}


def flax_names(where: str, new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """flax's argument names; the old ones still work for one release, with a warning."""
    out = dict(new)
    for old_name, value in old.items():
        if value is None:
            continue
        new_name = _OLD_ARGUMENTS[old_name]
        if out.get(new_name) is not None:
            raise TypeError(f"{where}: pass {new_name}=..., not both it and {old_name}=...")
        warnings.warn(
            f"{where}: {old_name}= was renamed {new_name}= (flax's nnx.LoRA names); the old "
            "name will be removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        out[new_name] = value
    if out.get("lora_rank") is None:
        raise TypeError(f"{where}: missing the keyword argument lora_rank=...")
    return out


def batched_init(
    init: Initializer,
    rng: jax.Array,
    batch_shape: tuple[int, ...],
    shape: tuple[int, ...],
    dtype: Any,
) -> jax.Array:
    """``init`` per batch index (independent keys), so fans never include batch axes."""
    count = math.prod(batch_shape)
    if not batch_shape:
        return init(rng, shape, dtype)
    keys = jax.random.split(rng, count)
    values = jax.vmap(lambda k: init(k, shape, dtype))(keys)
    return values.reshape(batch_shape + shape)
