"""The LoRA scale α of ``W = W_pre + α A Bᵀ``: what the model declares, what the optimizer uses.

LoRA-Muon divides its direction by α so that η stays a radius on W. A wrong α
is a silent wrong step (too long or too short by the ratio), so ``init``
compares the optimizer's α with the one the parameters declare, where they do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _checks
from lora_muon_jax._pairs import LoRAPair

LoRAScale = float | jax.Array | Callable[[str], float]


def _declares_scale(x: Any) -> bool:
    get = getattr(x, "get_metadata", None)
    if not callable(get) or isinstance(x, dict | list | tuple):
        return False
    try:
        metadata = get()
    except TypeError:
        return False
    return isinstance(metadata, Mapping) and "lora_scale" in metadata


def declared_lora_scales(tree: Any) -> dict[int, float]:
    """``{leaf index: s}`` for leaves whose container declares its LoRA scale.

    A container that carries ``get_metadata()["lora_scale"]`` (this package's
    NNX LoRA modules put ``s = α/r`` on their ``lora_a``/``lora_b`` Variables)
    declares ``s`` for every leaf inside it; indices are ``jax.tree.leaves``
    order, as ``LoRAPair.a_index``. Plain arrays declare nothing.
    """
    out: dict[int, float] = {}
    index = 0
    for node in jax.tree.leaves(tree, is_leaf=_declares_scale):
        if not _declares_scale(node):
            index += 1
            continue
        scale = float(node.get_metadata()["lora_scale"])
        for _ in jax.tree.leaves(node):
            out[index] = scale
            index += 1
    return out


def half_step(lora_scale: LoRAScale, pair: LoRAPair) -> jax.Array:
    """``1 / (2α)`` for ``pair`` as float32.

    A static α was checked when the optimizer was built (a number) or at
    ``init`` (a callable's number); a traced α that is not finite and > 0
    gives 0, i.e. a zero direction for that pair (never an infinite one).
    """
    value = _scale_value(lora_scale, pair)
    alpha = jnp.asarray(value, jnp.float32)
    if _checks.static_number(value) is not None:
        return 0.5 / alpha
    ok = _checks.valid(alpha, "positive")
    return jnp.where(ok, 0.5 / jnp.where(ok, alpha, 1.0), 0.0)


def _scale_value(lora_scale: LoRAScale, pair: LoRAPair) -> Any:
    return lora_scale(pair.name) if callable(lora_scale) else lora_scale


def _concrete_number(value: Any) -> float | None:
    """``value`` as a float when it is known now (a number or a concrete 0-d array)."""
    number = _checks.static_number(value)
    if number is not None or not isinstance(value, jax.Array) or value.ndim != 0:
        return number
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:  # a tracer: checked at run time
        return None


def pair_scale_checker(
    lora_scale: LoRAScale, where: str
) -> Callable[[list[LoRAPair], optax.Params], None]:
    """At ``init``: every pair's α is a finite number > 0 and agrees with the model's.

    A callable ``lora_scale`` must give every pair a number. Where the params
    declare their scale (this package's NNX LoRA modules put ``lora_scale = α/r``
    in their Variables' metadata, which ``nnx.Optimizer`` and ``nnx.state`` pass
    to ``init``), the optimizer's α must equal it: an adapter built with
    ``alpha=32, rank=2`` stepped with the default ``lora_scale=1`` would move W
    16× farther than η says.
    """

    def check(pairs: list[LoRAPair], params: optax.Params) -> None:
        declared = declared_lora_scales(params)
        for p in pairs:
            value = _scale_value(lora_scale, p)
            at = f"{where}: pair {p.name} (lora_a {'/'.join(p.a_path)})"
            if callable(lora_scale) and not isinstance(value, jax.Array):
                if _checks.static_number(value) is None:
                    raise TypeError(f"{at}: lora_scale must return a number, got {value!r}")
                _checks.check_static(at, "lora_scale", value, "positive")
            d_a, d_b = declared.get(p.a_index), declared.get(p.b_index)
            if d_a is not None and d_b is not None and d_a != d_b:
                raise ValueError(
                    f"{at}: lora_a declares lora_scale={d_a!r} but lora_b declares {d_b!r}"
                )
            model_scale = d_a if d_a is not None else d_b
            given = _concrete_number(value)
            if model_scale is None or given is None:
                continue  # nothing declared, or a traced α (checked at run time)
            if not math.isclose(given, model_scale, rel_tol=1e-6):
                raise ValueError(
                    f"{at}: the model declares lora_scale={model_scale!r} (its module's "
                    f"alpha/rank) but the optimizer was given lora_scale={given!r}: the step "
                    f"would be {model_scale / given:.4g}x the radius η on W. Pass "
                    "lora_scale=lora_muon_jax.flax.nnx.lora_scale_fn(model) (or the declared "
                    "number)."
                )

    return check
