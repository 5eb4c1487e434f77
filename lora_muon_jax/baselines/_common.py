"""Helpers shared by the baseline optimizers (learning rates, counters, fallbacks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _lora_muon, _pairs
from lora_muon_jax._lora_muon import _with_standard_promotion

F32 = jnp.float32


# One implementation each, shared with lora_muon itself.
increment = _lora_muon._increment
learning_rate_at = _lora_muon._learning_rate_at
ema_momenta = _lora_muon._ema_momenta


def partition_with_fallback(
    label: str,
    main_tx: optax.GradientTransformation,
    labels: Callable[[optax.Params], Any],
    *,
    learning_rate: optax.ScalarOrSchedule,
    fallback: optax.GradientTransformation | None,
    fallback_learning_rate: optax.ScalarOrSchedule | None,
    fallback_weight_decay: float | jax.Array,
    mu_dtype: Any,
) -> optax.GradientTransformationExtraArgs:
    """``optax.partition`` of ``main_tx`` (leaves labelled ``label``) and an AdamW fallback."""
    if fallback is not None and fallback_learning_rate is not None:
        raise ValueError("pass either `fallback` or `fallback_learning_rate`, not both")
    if fallback is None:
        fallback = optax.adamw(
            learning_rate if fallback_learning_rate is None else fallback_learning_rate,
            weight_decay=fallback_weight_decay,
            mu_dtype=mu_dtype,
        )
    return optax.partition(
        {
            label: optax.with_extra_args_support(main_tx),
            "fallback": _with_standard_promotion(fallback),
        },
        labels,
    )


def resolve_all_pairs(
    tree: Any,
    pair_rule: _pairs.PairRule | None,
    dimension_numbers: _pairs.DimensionNumbersArg,
    who: str,
) -> list[_pairs.LoraPair]:
    """The tree's LoRA pairs; every leaf must belong to one (else ValueError naming them)."""
    return _lora_muon._resolve_all_pairs(
        tree,
        pair_rule if pair_rule is not None else _pairs.default_pair_rule,
        dimension_numbers,
        who,
        "Use the full optimizer (non-LoRA leaves go to its fallback) or "
        "optax.partition with lora_param_labels.",
    )


def math_views(leaves: list[jax.Array], pair: _pairs.LoraPair) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` of a pair in math layout, float32: ``A (N, m, r)``, ``B (N, n, r)``."""
    a = _pairs.to_math_layout(leaves[pair.a_index], pair, "a").astype(F32)
    b = _pairs.to_math_layout(leaves[pair.b_index], pair, "b").astype(F32)
    return a, b


def lora_labels(
    pair_rule: _pairs.PairRule | None, dimension_numbers: _pairs.DimensionNumbersArg
) -> Callable[[optax.Params], Any]:
    """``params -> labels``: ``"lora"`` for factors of a pair, ``"fallback"`` otherwise."""
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule

    def labels(params: optax.Params) -> Any:
        return _pairs.lora_param_labels(params, pair_rule=rule, dimension_numbers=dimension_numbers)

    return labels
