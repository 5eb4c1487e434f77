"""The shared base of every pair-aware optimizer: the skeleton a LoRA update rule plugs into.

An optimizer of this family is a per-pair *direction* on EMA momenta, then a
scaled step with a weight-decay rule, with every non-LoRA leaf on a fallback:

    M ← β M + (1 − β) G                                    (ema_momenta)
    D = direction(pairs, factors, M)                       (the algorithm's own file)
    u = −η D − decay(λη) W                                 (scale_by_scaled_step)
    optax.partition({"lora": ..., "fallback": AdamW})      (fallback_partition)

``scale_by_pair_direction`` is the middle line as an optax transform (state
``(count, mu, *extra)``); LoRA-Muon, Spectron, LoRA-RITE and LoRA-Muon-OGD are
thin files that give it their direction. Core only: jax and optax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _pairs, _polar
from lora_muon_jax._pairs import DimensionNumbersArg, LoRAPair, PairRule

F32 = jnp.float32
# Under a schedule λη cannot be checked when the optimizer is built; at run time
# it is clipped to this so s = √(1 − λη) stays positive (static values must be < 1).
MAX_DECAY_FRACTION = 1.0 - 1e-6


def increment(count: jax.Array) -> jax.Array:
    return jnp.asarray(optax.safe_increment(count))


def learning_rate_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """η at step ``count`` as float32 (schedules are evaluated under standard promotion)."""
    if callable(learning_rate):
        # optax's schedules are not written for strict dtype promotion.
        with jax.numpy_dtype_promotion("standard"):
            return jnp.asarray(learning_rate(count), F32)
    return jnp.asarray(learning_rate, F32)


def ema_momenta(
    mus: Sequence[jax.Array], grads: Sequence[jax.Array], momentum: float | jax.Array
) -> list[jax.Array]:
    """``β M + (1 − β) G`` per leaf, in float32 (float64 for float64 leaves)."""
    out = []
    for m, g in zip(mus, grads, strict=True):
        dt = _polar.compute_dtype(m.dtype, g.dtype)
        beta = jnp.asarray(momentum, dt)
        out.append(beta * m.astype(dt) + (1.0 - beta) * g.astype(dt))
    return out


def no_params_error(what: str) -> ValueError:
    return ValueError(
        f"{what} needs the current parameters (the factors define the step) but `params` is "
        "None: call `update(grads, state, params)`."
    )


def resolve_all_pairs(
    tree: Any,
    rule: PairRule | None,
    dimension_numbers: DimensionNumbersArg,
    where: str,
    full_optimizer: str = "the full optimizer",
) -> list[LoRAPair]:
    """The tree's LoRA pairs; every leaf must belong to one (else a ValueError naming them)."""
    rule = rule if rule is not None else _pairs.default_pair_rule
    resolved = _pairs.resolve_pairs(tree, rule, dimension_numbers)
    if resolved.unpaired:
        shown = ", ".join(resolved.unpaired[:5])
        more = f" (and {len(resolved.unpaired) - 5} more)" if len(resolved.unpaired) > 5 else ""
        raise ValueError(
            f"{where}: leaves that are not LoRA factors: {shown}{more}. Use {full_optimizer} "
            "(non-LoRA leaves go to its fallback) or "
            "optax.partition(..., lora_param_labels(params))."
        )
    return resolved.pairs


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
) -> optax.GradientTransformationExtraArgs:
    """``optax.partition`` of ``main_tx`` (leaves labelled ``label``) and a fallback.

    The fallback defaults to ``optax.adamw(fallback_learning_rate or learning_rate,
    weight_decay=fallback_weight_decay)``, as ``optax.contrib.muon`` does.
    """
    if fallback is not None and fallback_learning_rate is not None:
        raise ValueError("pass either `fallback` or `fallback_learning_rate`, not both")
    if fallback is None:
        fallback = optax.adamw(
            learning_rate if fallback_learning_rate is None else fallback_learning_rate,
            weight_decay=fallback_weight_decay,
            mu_dtype=mu_dtype,
        )
    branches: dict[Any, optax.GradientTransformation] = {
        label: optax.with_extra_args_support(main_tx),
        "fallback": with_standard_promotion(fallback),
    }
    return optax.partition(branches, labels)


# ---------------------------------------------------------------- the skeleton


class PairDirection(Protocol):
    """``(pairs, factors, momenta, extra) -> ({leaf index: direction}, new extra)``.

    ``factors`` and ``momenta`` are the tree's leaves (momenta already updated,
    float32); a direction has its leaf's shape and is returned in the compute
    dtype. ``extra`` is the optimizer's own state beyond ``(count, mu)``.
    """

    def __call__(
        self,
        pairs: list[LoRAPair],
        factors: list[jax.Array],
        momenta: list[jax.Array],
        extra: tuple[Any, ...],
    ) -> tuple[dict[int, jax.Array], tuple[Any, ...]]: ...


def scale_by_pair_direction(
    direction: PairDirection,
    *,
    name: str,
    full_optimizer: str = "the full optimizer",
    state_type: Callable[..., NamedTuple],
    init_extra: Callable[[list[LoRAPair]], tuple[Any, ...]] = lambda pairs: (),
    cast_to_grads: bool = False,
    momentum: float | jax.Array = 0.9,
    nesterov: bool = False,
    mu_dtype: Any = None,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
) -> optax.GradientTransformationExtraArgs:
    """EMA momenta of every factor, then ``direction`` per pair (no learning rate).

    The state is ``state_type(count, mu, *extra)``: ``count`` int32, ``mu`` the
    params' tree in ``mu_dtype`` (default: the params' dtype), ``extra`` from
    ``init_extra(pairs)`` and then from ``direction``. Directions come back in
    the compute dtype, or in the gradients' dtypes with ``cast_to_grads``.
    Nesterov feeds the
    direction ``β M + (1 − β) G``; the state keeps M. Every leaf must belong to a
    pair (``resolve_all_pairs``; the error points to ``full_optimizer``);
    ``update`` needs ``params``.
    """

    def init_fn(params: optax.Params) -> Any:
        pairs = resolve_all_pairs(
            params, pair_rule, dimension_numbers, f"{name}.init", full_optimizer
        )
        return state_type(
            jnp.zeros([], jnp.int32),
            optax.tree.zeros_like(params, dtype=mu_dtype),
            *init_extra(pairs),
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        st: Any = state
        pairs = resolve_all_pairs(
            updates, pair_rule, dimension_numbers, f"{name}.update", full_optimizer
        )
        grads, treedef = jax.tree_util.tree_flatten(updates)
        if not grads:
            return updates, st._replace(count=increment(st.count))
        if params is None:
            raise no_params_error(name)
        factors = treedef.flatten_up_to(params)
        mus = treedef.flatten_up_to(st.mu)
        with jax.named_scope(f"{name}/momentum"):
            new_mu = ema_momenta(mus, grads, momentum)
            mu_hat = ema_momenta(new_mu, grads, momentum) if nesterov else new_mu
        with jax.named_scope(f"{name}/direction"):
            directions, extra = direction(pairs, factors, mu_hat, tuple(st[2:]))
        out = [directions[i] if i in directions else g for i, g in enumerate(grads)]
        if cast_to_grads:
            out = [u.astype(g.dtype) for u, g in zip(out, grads, strict=True)]
        new_mu_cast = [m.astype(old.dtype) for m, old in zip(new_mu, mus, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), state_type(
            increment(st.count), jax.tree_util.tree_unflatten(treedef, new_mu_cast), *extra
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------- scaled step + decay

DecayRule = Literal["split", "decoupled"]
DECAY_RULES: dict[str, str] = {
    "split": (
        "LoRA-Muon's split rule on a factor pair, s = √(1 − λη): A ← sA + ΔA/s, i.e. "
        "u = −(η/s) D − λη/(1 + s) A; the product A Bᵀ decays by exactly 1 − λη."
    ),
    "decoupled": "decoupled decay per leaf: u = −η D − λη W (dense Muon's W ← (1 − λη) W − η D).",
}


def scale_by_scaled_step(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | jax.Array,
    *,
    rule: DecayRule,
    state_type: Callable[[jax.Array], NamedTuple],
    name: str,
) -> optax.GradientTransformationExtraArgs:
    """``−η`` times the incoming direction plus weight decay by ``rule`` (``DECAY_RULES``).

    η scales the direction in float32 (float64 for float64 leaves) before the
    cast to the parameters' dtype. State: ``state_type(count)``.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"rule must be one of {sorted(DECAY_RULES)}, got {rule!r}")

    def init_fn(params: optax.Params) -> Any:
        del params
        return state_type(jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        count = cast(Any, state).count
        if not jax.tree_util.tree_leaves(updates):
            return updates, state_type(increment(count))
        if params is None:
            raise no_params_error(name)
        lr = learning_rate_at(learning_rate, count)
        if rule == "split":
            decay_fraction = jnp.clip(jnp.asarray(weight_decay, F32) * lr, 0.0, MAX_DECAY_FRACTION)
            s = jnp.sqrt(1.0 - decay_fraction)
            step_coeff, decay_coeff = -lr / s, -decay_fraction / (1.0 + s)
        else:
            step_coeff, decay_coeff = -lr, -jnp.asarray(weight_decay, F32) * lr

        def leaf(d: jax.Array, p: jax.Array) -> jax.Array:
            dt = _polar.compute_dtype(d.dtype, p.dtype)
            step = step_coeff.astype(dt) * d.astype(dt) + decay_coeff.astype(dt) * p.astype(dt)
            return step.astype(p.dtype)

        with jax.named_scope(f"{name}/step"):
            new_updates = jax.tree.map(leaf, updates, params)
        return new_updates, state_type(increment(count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
