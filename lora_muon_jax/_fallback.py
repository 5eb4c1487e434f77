"""The fallback half of a pair-aware optimizer: every leaf that is not a LoRA factor.

``fallback_partition`` is ``optax.partition({"lora": main, "fallback": AdamW})``
with the checks around it: the gradients must have the parameters' shapes, a
tree without any pair raises (unless allowed), and leaves that silently reach
the default AdamW at the main learning rate are reported once. The default
AdamW runs in float32 for 16-bit leaves (``in_float32``). Core only: jax and optax.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _checks, _pairs
from lora_muon_jax._pairs import DimensionNumbersArg, PairRule

F32 = jnp.float32


def with_standard_promotion(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Trace ``tx`` under standard dtype promotion; updates keep the gradients' dtypes.

    optax's own transforms (e.g. ``adamw``'s bias correction ``b1 ** count``
    with an int32 count) are not written for ``jax_numpy_dtype_promotion=
    "strict"``; this keeps the optimizers usable when a user enables it.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> Any:
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        with jax.numpy_dtype_promotion("standard"):
            new_updates, new_state = tx.update(updates, state, params, **extra_args)
        # e.g. adamw with mu_dtype=float32 returns float32 updates for bf16 grads.
        new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pair_labels(
    pair_rule: PairRule | None, dimension_numbers: DimensionNumbersArg, label: str = "lora"
) -> Callable[[optax.Params], Any]:
    """``params -> labels``: ``label`` for factors of a pair, ``"fallback"`` otherwise."""
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule

    def labels(params: optax.Params) -> Any:
        return _pairs.lora_param_labels(
            params, pair_rule=rule, dimension_numbers=dimension_numbers, lora_label=label
        )

    return labels


def _is_low_precision(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _to_float32(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not _is_low_precision(dtype):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, F32, sharding=x.sharding)
    return jnp.asarray(x).astype(F32)


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run ``tx`` on float32 copies of 16-bit (and narrower) float leaves.

    Its state is then float32 for those leaves (AdamW's ``nu = EMA(g²)``
    overflows float16 from |g| ≈ 256) and its updates are cast back to the
    gradients' dtypes. Float32 and float64 leaves pass through unchanged.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> Any:
        return tx.init(jax.tree.map(_to_float32, params))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        up_params = None if params is None else jax.tree.map(_to_float32, params)
        new, new_state = tx.update(
            jax.tree.map(_to_float32, updates), state, up_params, **extra_args
        )
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _lr_text(learning_rate: Any) -> str:
    number = _checks.static_number(learning_rate)
    if number is not None:
        return f"learning_rate={number!r}"
    return "the `learning_rate` schedule" if callable(learning_rate) else "`learning_rate`"


def fallback_partition(
    main_tx: optax.GradientTransformation,
    labels: Callable[[optax.Params], Any],
    *,
    label: str = "lora",
    learning_rate: optax.ScalarOrSchedule,
    fallback: optax.GradientTransformation | None,
    fallback_learning_rate: optax.ScalarOrSchedule | None,
    fallback_weight_decay: float | jax.Array,
    mu_dtype: Any,
    name: str = "the optimizer",
    allow_no_pairs: bool = True,
    report_default_fallback: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``optax.partition`` of ``main_tx`` (leaves labelled ``label``) and a fallback.

    The fallback defaults to ``optax.adamw(fallback_learning_rate or learning_rate,
    weight_decay=fallback_weight_decay)``, as ``optax.contrib.muon`` does, run in
    float32 for 16-bit leaves (``in_float32``: its moments are float32 there,
    the first one in ``mu_dtype`` if given). ``update`` first checks that the
    gradients have the parameters' paths and shapes (a ``ValueError`` naming
    the path). With ``allow_no_pairs=False``, ``init`` on a tree with no leaf
    labelled ``label`` raises; with ``report_default_fallback``, ``init`` warns
    once (``UserWarning``) about the leaves that reach the default fallback at
    the main learning rate (no ``fallback_learning_rate`` given).
    """
    if fallback is not None and fallback_learning_rate is not None:
        raise ValueError("pass either `fallback` or `fallback_learning_rate`, not both")
    if fallback_learning_rate is not None and not callable(fallback_learning_rate):
        _checks.check_static(name, "fallback_learning_rate", fallback_learning_rate, "nonnegative")
    _checks.check_static(name, "fallback_weight_decay", fallback_weight_decay, "nonnegative")
    report = report_default_fallback and fallback is None and fallback_learning_rate is None
    if fallback is None:
        fallback = in_float32(
            optax.adamw(
                learning_rate if fallback_learning_rate is None else fallback_learning_rate,
                weight_decay=fallback_weight_decay,
                mu_dtype=mu_dtype,
            )
        )
    fallback = with_standard_promotion(fallback)

    def fallback_init(params: optax.Params) -> Any:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        if report and leaves:
            shown = ", ".join(jax.tree_util.keystr(tuple(p)) for p, _ in leaves[:5])
            more = f" (and {len(leaves) - 5} more)" if len(leaves) > 5 else ""
            warnings.warn(
                f"{name}: {len(leaves)} parameter leaves are not LoRA factors and go to the "
                f"AdamW fallback at the LoRA learning rate ({_lr_text(learning_rate)}: a "
                f"spectral radius, not an AdamW step size): {shown}{more}. Pass "
                "fallback_learning_rate=... (or fallback=...) to choose their step, or give "
                "the optimizer only the factors (nnx.Optimizer(..., wrt=nnx.LoRAParam), or "
                "optax.partition with lora_param_labels).",
                UserWarning,
                stacklevel=2,
            )
        return fallback.init(params)

    branches: dict[Any, optax.GradientTransformation] = {
        label: optax.with_extra_args_support(main_tx),
        "fallback": optax.GradientTransformationExtraArgs(fallback_init, fallback.update),
    }
    tx = optax.partition(branches, labels)

    def init_fn(params: optax.Params) -> Any:
        if (
            not allow_no_pairs
            and _checks.should_have_pairs(params)
            and label not in jax.tree.leaves(labels(params))
        ):
            raise _checks.no_pairs_error(f"{name}.init", params, "allow_no_pairs=True")
        return tx.init(params)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        _checks.check_grads_match_params(f"{name}.update", updates, params)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
