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

from lora_muon_jax import _checks, _fallback, _pairs, _polar
from lora_muon_jax._pairs import DimensionNumbersArg, LoRAPair, PairRule

F32 = jnp.float32

# The fallback half of the family's optimizers lives in _fallback.
fallback_partition = _fallback.fallback_partition
pair_labels = _fallback.pair_labels
with_standard_promotion = _fallback.with_standard_promotion
# λη < 1 is checked when the optimizer is built (static numbers) or at run time
# (a traced λη ≥ 1 gives a zero step); a valid λη is clipped to this so float32
# rounding cannot make s = √(1 − λη) zero: s ≥ 1e-3.
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


def check_decay_fraction(
    where: str, learning_rate: Any, weight_decay: Any, rule: DecayRule = "split"
) -> None:
    """``ValueError`` unless λη < 1 when both are static numbers.

    Split rule: s = √(1 − λη) needs it; decoupled rule: W ← (1 − λη) W would
    zero or flip W at λη ≥ 1.
    """
    lr, wd = _checks.static_number(learning_rate), _checks.static_number(weight_decay)
    if lr is None or wd is None or lr * wd < 1.0:
        return
    if rule == "decoupled":
        raise ValueError(
            f"{where}: decoupled weight decay W ← (1 − λη) W with weight_decay * "
            f"learning_rate = {lr * wd!r} >= 1 zeroes or flips the weights "
            f"(weight_decay={_checks.shown(weight_decay)}, "
            f"learning_rate={_checks.shown(learning_rate)})"
        )
    raise ValueError(
        f"{where}: the split weight decay needs weight_decay * learning_rate < 1 "
        f"(s = sqrt(1 - λη)), got weight_decay={_checks.shown(weight_decay)} * "
        f"learning_rate={_checks.shown(learning_rate)} = {lr * wd!r}"
    )


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
    """The tree's LoRA pairs; every leaf must belong to one (else a ValueError naming them).

    A pair with a zero-size axis (rank 0, m = 0 or n = 0) raises a ValueError
    naming both factors' paths and shapes.
    """
    rule = rule if rule is not None else _pairs.default_pair_rule
    resolved = _pairs.resolve_pairs(tree, rule, dimension_numbers)
    _checks.check_pair_sizes(where, tree, resolved.pairs)
    if resolved.unpaired:
        shown = ", ".join(resolved.unpaired[:5])
        more = f" (and {len(resolved.unpaired) - 5} more)" if len(resolved.unpaired) > 5 else ""
        raise ValueError(
            f"{where}: leaves that are not LoRA factors: {shown}{more}. Use {full_optimizer} "
            "(non-LoRA leaves go to its fallback) or "
            "optax.partition(..., lora_param_labels(params))."
        )
    return resolved.pairs


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
    allow_no_pairs: bool = True,
    check_pairs: Callable[[list[LoRAPair], optax.Params], None] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """EMA momenta of every factor, then ``direction`` per pair (no learning rate).

    The state is ``state_type(count, mu, *extra)``: ``count`` int32, ``mu`` the
    params' tree in ``mu_dtype`` (default: the params' dtype), ``extra`` from
    ``init_extra(pairs)`` and then from ``direction``. Directions come back in
    the compute dtype, or in the gradients' dtypes with ``cast_to_grads``.
    Nesterov feeds the
    direction ``β M + (1 − β) G``; the state keeps M. Every leaf must belong to a
    pair (``resolve_all_pairs``; the error points to ``full_optimizer``);
    ``update`` needs ``params`` and checks that the gradients have their shapes.

    ``init`` raises on a tree with leaves but no pair unless ``allow_no_pairs``,
    then calls ``check_pairs(pairs, params)`` (an optimizer's own checks). A static
    ``momentum`` (a Python or NumPy number) must be finite and in [0, 1); a
    traced one (an array, ``inject_hyperparams``) outside that range makes the
    step a no-op: zero directions, momenta and ``extra`` unchanged.
    """
    static_momentum = _checks.check_static(name, "momentum", momentum, "momentum")
    _checks.check_mu_dtype(name, mu_dtype)

    def init_fn(params: optax.Params) -> Any:
        pairs = resolve_all_pairs(
            params, pair_rule, dimension_numbers, f"{name}.init", full_optimizer
        )
        if not pairs and not allow_no_pairs and _checks.should_have_pairs(params):
            raise _checks.no_pairs_error(f"{name}.init", params, "allow_no_pairs=True")
        if check_pairs is not None:
            check_pairs(pairs, params)
        extra = init_extra(pairs)
        if not _checks.should_have_pairs(params):
            # optax.tree.map_params' placeholder: per-pair dicts are not param-shaped, and a
            # leaf here marks each as one non-param subtree (its keys are the real pairs').
            extra = tuple(jnp.zeros([], jnp.int32) for _ in extra)
        return state_type(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params, dtype=mu_dtype), *extra
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        st: Any = state
        grads, treedef = jax.tree_util.tree_flatten(updates)
        if not grads:
            return updates, st._replace(count=increment(st.count))
        if params is None:
            raise no_params_error(name)
        _checks.check_grads_match_params(f"{name}.update", updates, params)
        pairs = resolve_all_pairs(
            updates, pair_rule, dimension_numbers, f"{name}.update", full_optimizer
        )
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
        if static_momentum is None:  # traced: an invalid β is a no-op step
            ok = _checks.valid(jnp.asarray(momentum, F32), "momentum")
            out = [jnp.where(ok, u, jnp.zeros_like(u)) for u in out]
            new_mu_cast = [jnp.where(ok, m, old) for m, old in zip(new_mu_cast, mus, strict=True)]
            extra = jax.tree.map(lambda new, old: jnp.where(ok, new, old), extra, tuple(st[2:]))
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

    Static η and λ (Python or NumPy numbers) must be finite and ≥ 0, and
    λη < 1 (split: s = √(1 − λη); decoupled: 1 − λη ≤ 0 would zero or flip W):
    else a ``ValueError`` here. Traced ones (schedules,
    arrays, ``inject_hyperparams``) are checked at every step: a step whose η
    or λ is negative or not finite, or whose λη ≥ 1 (either rule), is a zero
    update (the factors are neither decayed nor amplified). A valid λη is
    clipped to ``MAX_DECAY_FRACTION`` so that s ≥ 1e-3 after float32 rounding.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"rule must be one of {sorted(DECAY_RULES)}, got {rule!r}")
    static_lr = None
    if not callable(learning_rate):
        static_lr = _checks.check_static(name, "learning_rate", learning_rate, "nonnegative")
    static_wd = _checks.check_static(name, "weight_decay", weight_decay, "nonnegative")
    check_decay_fraction(name, learning_rate, weight_decay, rule)
    traced = static_lr is None or static_wd is None

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
        wd = jnp.asarray(weight_decay, F32)
        if rule == "split":
            decay_fraction = jnp.clip(wd * lr, 0.0, MAX_DECAY_FRACTION)
            s = jnp.sqrt(1.0 - decay_fraction)
            step_coeff, decay_coeff = -lr / s, -decay_fraction / (1.0 + s)
        else:
            step_coeff, decay_coeff = -lr, -wd * lr
        if traced:  # an invalid η, λ or λη: a zero step (never a blown-up one)
            ok = _checks.valid(lr, "nonnegative") & _checks.valid(wd, "nonnegative")
            # λη >= 1: split has no s = √(1 − λη); decoupled would zero or flip W.
            ok = ok & _checks.valid(wd * lr, "decay_fraction")
            zero = jnp.zeros([], F32)
            step_coeff = jnp.where(ok, step_coeff, zero)
            decay_coeff = jnp.where(ok, decay_coeff, zero)

        def leaf(d: jax.Array, p: jax.Array) -> jax.Array:
            dt = _polar.compute_dtype(d.dtype, p.dtype)
            step = step_coeff.astype(dt) * d.astype(dt) + decay_coeff.astype(dt) * p.astype(dt)
            if jnp.finfo(p.dtype).maxexp < jnp.finfo(dt).maxexp:  # float16, not bfloat16
                # A step float16 cannot hold (entries ~η/σ_min of an ill-conditioned partner)
                # is shrunk as a whole to fit, never cast to inf: its halves shrink, the
                # direction is kept. A no-op wherever the step fits.
                big = jnp.max(jnp.abs(step), initial=0.0)
                fits = jnp.asarray(jnp.finfo(p.dtype).max / 4, dt)
                step = step * jnp.where(big > fits, fits / jnp.where(big > fits, big, 1.0), 1.0)
            return step.astype(p.dtype)

        with jax.named_scope(f"{name}/step"):
            new_updates = jax.tree.map(leaf, updates, params)
        return new_updates, state_type(increment(count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
