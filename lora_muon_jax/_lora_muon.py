"""LoRA-Muon: spectral steepest descent on the low-rank manifold, as optax transforms.

For every LoRA pair ``W = W_pre + α A Bᵀ`` (``A: m×r``, ``B: n×r``), with EMA
momenta ``M_A, M_B`` of the factor gradients,

    ΔA = -(η / 2α) msign(M_A R_B) R_B,   ΔB = -(η / 2α) msign(M_B R_A) R_A,
    R_A = (AᵀA)^{-1/2}, R_B = (BᵀB)^{-1/2},
    A ← s A + ΔA / s,   B ← s B + ΔB / s,   s = √(1 − λη).

η (``learning_rate``) is the spectral-norm radius of the step on W: each tangent
half ``α ΔA Bᵀ`` and ``α A ΔBᵀ`` has spectral norm η/2. The split weight decay
decays the product ``A Bᵀ`` by exactly ``1 − λη`` (dense Muon's rate) and leaves
the tangent step untouched. The step is invariant to the gauge
``(A, B) → (A R, B R^{-T})``.

Three tiers: ``lora_muon_direction`` (pure arrays), ``scale_by_lora_muon``
(momentum + direction; no learning rate, no decay), ``lora_muon`` (the full
optimizer with split decay and a fallback for non-LoRA parameters).

Reference: Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest
Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _direction, _pairs, _polar, _rebalance
from lora_muon_jax._direction import Method
from lora_muon_jax._pairs import DimensionNumbersArg, PairRule

_F32 = jnp.float32
# Under a schedule λη cannot be checked when the optimizer is built; at run time
# it is clipped to this so s = √(1 − λη) stays positive (static values must be < 1).
_MAX_DECAY_FRACTION = 1.0 - 1e-6

LoraScale = float | jax.Array | Callable[[str], float]


class ScaleByLoraMuonState(NamedTuple):
    """State of ``scale_by_lora_muon``: one momentum per factor, no second moments."""

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of factor gradients: the params' tree and shapes, dtype mu_dtype


class ScaleBySplitWeightDecayState(NamedTuple):
    """State of ``scale_by_split_weight_decay``."""

    count: jax.Array  # int32[], step index for the learning-rate schedule


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=_F32)


def _increment(count: jax.Array) -> jax.Array:
    return jnp.asarray(optax.safe_increment(count))


def _learning_rate_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """η at step ``count`` as float32 (schedules are evaluated under standard promotion)."""
    if callable(learning_rate):
        # optax's schedules are not written for strict dtype promotion.
        with jax.numpy_dtype_promotion("standard"):
            return _f32(learning_rate(count))
    return _f32(learning_rate)


def _ema_momenta(
    mus: list[jax.Array], grads: list[jax.Array], momentum: float | jax.Array
) -> list[jax.Array]:
    """``β M + (1 − β) G`` per leaf, in float32."""
    beta = _f32(momentum)
    return [
        beta * m.astype(_F32) + (1.0 - beta) * g.astype(_F32)
        for m, g in zip(mus, grads, strict=True)
    ]


def _resolve_all_pairs(
    tree: Any, rule: PairRule, dimension_numbers: DimensionNumbersArg, where: str, hint: str
) -> list[_pairs.LoraPair]:
    """The tree's LoRA pairs; every leaf must belong to one (else ValueError naming them)."""
    resolved = _pairs.resolve_pairs(tree, rule, dimension_numbers)
    if resolved.unpaired:
        shown = ", ".join(resolved.unpaired[:5])
        more = f" (and {len(resolved.unpaired) - 5} more)" if len(resolved.unpaired) > 5 else ""
        raise ValueError(f"{where}: leaves that are not LoRA factors: {shown}{more}. {hint}")
    return resolved.pairs


def _no_params_error(what: str) -> ValueError:
    return ValueError(
        f"{what} needs the current parameters (the factors' Grams define the step) "
        "but `params` is None: call `update(grads, state, params)`."
    )


def _pair_scale(lora_scale: LoraScale, name: str) -> jax.Array:
    value = lora_scale(name) if callable(lora_scale) else lora_scale
    return _f32(value)


# Pairs whose views share shapes, orientations and dtypes are concatenated
# along the batch axis so the compiled step has a fixed number of tall products
# per distinct shape, not per adapter.
_STACK_EQUAL_SHAPES = True


def _stacked_directions(
    views: list[_direction.FactorPair], method: Method
) -> list[tuple[jax.Array, jax.Array]]:
    if not _STACK_EQUAL_SHAPES:
        return _direction.lora_muon_directions(views, method)
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(views):
        # Stacking differently sharded arrays would gather them (Auto mesh) or
        # fail (Explicit mesh): equal sharding is part of the key.
        key = (
            *(
                (x.shape[1:], x.dtype, getattr(jax.typeof(x), "sharding", None))
                for x in (v.a, v.b, v.mu_a, v.mu_b)
            ),
            v.a_rank_first,
            v.b_rank_first,
        )
        groups.setdefault(key, []).append(i)
    stacked = []
    for idx in groups.values():
        a, b, mu_a, mu_b = (jnp.concatenate([views[i][f] for i in idx]) for f in range(4))
        v0 = views[idx[0]]
        stacked.append(_direction.FactorPair(a, b, mu_a, mu_b, v0.a_rank_first, v0.b_rank_first))
    results = _direction.lora_muon_directions(stacked, method)
    # Keep XLA from fusing every per-leaf tail (slice, scale, decay) into the
    # stacked products: without it compile time grows ~3x and nothing runs faster.
    results = [jax.lax.optimization_barrier(r) for r in results]
    out: list[Any] = [None] * len(views)
    for idx, (u_a, u_b) in zip(groups.values(), results, strict=True):
        bounds = [0]
        for i in idx:
            bounds.append(bounds[-1] + views[i].a.shape[0])
        for j, i in enumerate(idx):
            out[i] = (u_a[bounds[j] : bounds[j + 1]], u_b[bounds[j] : bounds[j + 1]])
    return out


def scale_by_lora_muon(
    momentum: float | jax.Array = 0.9,
    *,
    nesterov: bool = False,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: LoraScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum plus the LoRA-Muon direction, per factor pair (no learning rate).

    For each pair, ``M ← β M + (1 − β) G`` on both factors (Nesterov: the
    direction uses ``β M + (1 − β) G``), then returns

        D_A = msign(M_A R_B) R_B / (2α),   D_B = msign(M_B R_A) R_A / (2α),

    so that ``‖α D_A Bᵀ‖₂ = ‖α A D_Bᵀ‖₂ = 1/2``: scaling by ``-η`` gives a step
    whose two tangent halves have spectral norm η/2 on W. No bias correction:
    the direction does not depend on the scale of M.

    Every leaf must belong to a LoRA pair (use ``lora_muon``, or
    ``optax.partition`` with ``lora_param_labels``, for mixed trees).

    Args:
      momentum: EMA rate β of the factor momenta.
      nesterov: use Nesterov momentum (off in the paper).
      method: ``"gram"`` (default; fast Gram form) or ``"paper"`` (Algorithm 1
        literally); see ``lora_muon_jax.METHODS``.
      mu_dtype: dtype of the momenta (default: the parameters' dtype). The math
        runs in float32 whatever this is.
      lora_scale: α in ``W = W_pre + α A Bᵀ`` (qwix: alpha/rank), a number or
        ``f(pair_name) -> float``; the step is divided by it so η stays a
        radius on W.
      pair_rule: ``f(path: tuple[str, ...]) -> (group, "a" | "b") | None``;
        ``None`` means ``default_pair_rule``. Under ``optax.inject_hyperparams``
        name callables in ``static_args``.
      dimension_numbers: ``None`` (infer), a ``LoraDimensionNumbers`` or
        ``f(pair_name, a_shape, b_shape)``; see ``find_lora_pairs``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params``. Its updates are in float32 (float64 for float64 factors),
      whatever the factors' dtype: a unit direction can overflow float16
      where ``η·D`` does not. ``scale_by_split_weight_decay`` (or
      ``optax.apply_updates``) casts back after scaling.
    """
    _direction.check_method(method)
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule

    def _resolve(tree: Any, where: str) -> list[_pairs.LoraPair]:
        return _resolve_all_pairs(
            tree,
            rule,
            dimension_numbers,
            f"scale_by_lora_muon.{where}",
            "Use lora_muon(...) (non-LoRA leaves go to its fallback) or "
            "optax.partition(..., lora_param_labels(params)).",
        )

    def init_fn(params: optax.Params) -> ScaleByLoraMuonState:
        _resolve(params, "init")
        return ScaleByLoraMuonState(
            count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype)
        )

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByLoraMuonState]:
        del extra_args
        state = cast(ScaleByLoraMuonState, state)
        pairs = _resolve(updates, "update")
        grads, treedef = jax.tree_util.tree_flatten(updates)
        if not grads:
            return updates, state._replace(count=_increment(state.count))
        if params is None:
            raise _no_params_error("scale_by_lora_muon")
        factors = treedef.flatten_up_to(params)
        mus = treedef.flatten_up_to(state.mu)
        new_mu = _ema_momenta(mus, grads, momentum)
        if nesterov:
            mu_hat = _ema_momenta(new_mu, grads, momentum)
        else:
            mu_hat = new_mu

        def views(p: _pairs.LoraPair) -> _direction.FactorPair:
            a, a_rank_first = _pairs.to_matrix_view(factors[p.a_index], p, "a")
            b, b_rank_first = _pairs.to_matrix_view(factors[p.b_index], p, "b")
            mu_a, _ = _pairs.to_matrix_view(mu_hat[p.a_index], p, "a")
            mu_b, _ = _pairs.to_matrix_view(mu_hat[p.b_index], p, "b")
            return _direction.FactorPair(a, b, mu_a, mu_b, a_rank_first, b_rank_first)

        directions = _stacked_directions([views(p) for p in pairs], method)
        out: list[Any] = list(grads)
        for p, (u_a, u_b) in zip(pairs, directions, strict=True):
            half = 0.5 / _pair_scale(lora_scale, p.name)
            for index, u, role in ((p.a_index, u_a, "a"), (p.b_index, u_b, "b")):
                u = _pairs.from_matrix_view(u * half.astype(u.dtype), p, role)  # type: ignore[arg-type]
                # The unit direction stays in the compute dtype (float32 for
                # half-precision factors): it can exceed float16's range where
                # η·D does not, so the cast to the parameters' dtype comes
                # after the learning rate (scale_by_split_weight_decay).
                out[index] = u.astype(_polar.compute_dtype(grads[index].dtype))
        new_mu_cast = [m.astype(old.dtype) for m, old in zip(new_mu, mus, strict=True)]
        return (
            jax.tree_util.tree_unflatten(treedef, out),
            ScaleByLoraMuonState(
                count=_increment(state.count),
                mu=jax.tree_util.tree_unflatten(treedef, new_mu_cast),
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_split_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | jax.Array = 0.01,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale a LoRA direction by ``-η`` and apply the paper's split weight decay.

    With ``s = √(1 − λη)`` each factor moves to ``s A + ΔA / s`` where
    ``ΔA = -η D_A``: the update is ``-(η/s) D_A − (λη / (1 + s)) A``. The decay
    term is written as ``λη/(1+s)`` (equal to ``1 − s``) so it keeps its digits
    when λη is tiny. Then ``A'B'ᵀ = (1 − λη) ABᵀ + ΔA Bᵀ + A ΔBᵀ + ΔA ΔBᵀ/s²``.

    Args:
      learning_rate: η, a float or an optax schedule.
      weight_decay: λ; λη must be < 1 (checked when both are numbers; under a
        schedule λη is clipped to 1 − 1e-6).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
    """

    def init_fn(params: optax.Params) -> ScaleBySplitWeightDecayState:
        del params
        return ScaleBySplitWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleBySplitWeightDecayState]:
        del extra_args
        state = cast(ScaleBySplitWeightDecayState, state)
        if not jax.tree_util.tree_leaves(updates):
            return updates, ScaleBySplitWeightDecayState(_increment(state.count))
        if params is None:
            raise _no_params_error("scale_by_split_weight_decay")
        lr = _learning_rate_at(learning_rate, state.count)
        decay_fraction = jnp.clip(_f32(weight_decay) * lr, 0.0, _MAX_DECAY_FRACTION)
        s = jnp.sqrt(1.0 - decay_fraction)
        step_coeff = -lr / s
        decay_coeff = -decay_fraction / (1.0 + s)

        def leaf(d: jax.Array, p: jax.Array) -> jax.Array:
            # η scales the direction before the cast to the parameters' dtype.
            dt = _polar.compute_dtype(d.dtype, p.dtype)
            step = step_coeff.astype(dt) * d.astype(dt) + decay_coeff.astype(dt) * p.astype(dt)
            return step.astype(p.dtype)

        new_updates = jax.tree.map(leaf, updates, params)
        return new_updates, ScaleBySplitWeightDecayState(_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_standard_promotion(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Trace ``tx`` under standard dtype promotion; updates keep the gradients' dtypes.

    optax's own transforms (e.g. ``adamw``'s bias correction ``b1 ** count``
    with an int32 count) are not written for ``jax_numpy_dtype_promotion=
    "strict"``; this keeps ``lora_muon`` usable when a user enables it.
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


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def lora_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.9,
    nesterov: bool = False,
    weight_decay: float | jax.Array = 0.01,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: LoraScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
    rebalance: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Muon (Cesista et al., 2026): the paper's Algorithm 1 as an optax optimizer.

    Per LoRA pair ``W = W_pre + α A Bᵀ`` (found by tree structure, see
    ``find_lora_pairs``):

        M ← β M + (1 − β) G,   ΔA = -(η/2α) msign(M_A R_B) R_B,   ΔB = -(η/2α) msign(M_B R_A) R_A,
        A ← s A + ΔA / s,   B ← s B + ΔB / s,   R_X = (XᵀX)^{-1/2},   s = √(1 − λη).

    Every other leaf goes to ``fallback`` (default: ``optax.adamw`` with
    ``fallback_learning_rate`` and ``fallback_weight_decay``).

    Hyperparameters:
      * ``learning_rate`` η is the **spectral-norm radius of the step on W**:
        each tangent half gets η/2 whatever the width, rank or factor scale
        (no shape factor). The paper reports the same best η (0.1) for dense
        Muon and LoRA-Muon at every rank ≥ 2 on TinyShakespeare; this
        package's shorter reproduction found it within one ×3.16 grid step
        across ranks (docs/reproduction.md). Start from dense Muon's η.
      * ``weight_decay`` λ (paper: 0.01) decays the product ``A Bᵀ`` by
        ``1 − λη`` per step, like dense Muon's decoupled decay on W.
      * ``momentum`` β (paper: 0.9), EMA; ``nesterov`` off in the paper.
      * ``lora_scale`` α: declare your adapter's scale (qwix: ``alpha/rank``)
        so η stays a radius on W. Leave at 1 for ``nnx.LoRA``.

    Args:
      learning_rate: η, a float or an optax schedule.
      momentum: EMA rate β.
      nesterov: Nesterov momentum.
      weight_decay: λ, applied with the split rule; λη < 1.
      method: ``"gram"`` (default: the Gram form where an r×r bound says it
        is exact, a robust matmul-only form elsewhere; each half ≤ η/2·(1 + 1e-3)
        always, docs/numerics.md) or ``"paper"`` (Algorithm 1 with the paper's
        Tables 1–2); see ``lora_muon_jax.METHODS``.
      mu_dtype: momentum dtype (default: the parameters' dtype); math is float32.
      lora_scale: α, a number or ``f(pair_name) -> float``.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: axis layout of pairs (default: inferred).
      fallback: the transformation for non-LoRA leaves (overrides the two
        ``fallback_*`` arguments).
      fallback_learning_rate: AdamW learning rate for non-LoRA leaves
        (default: ``learning_rate``, as ``optax.contrib.muon`` does; its units
        differ — a per-entry step, not a spectral radius — so set it).
      fallback_weight_decay: AdamW weight decay for non-LoRA leaves.
      rebalance: after each step, rescale every pair to ``(c A, B / c)`` with
        ``‖c A‖₂ = ‖B / c‖₂`` and its momenta to ``(M_A / c, c M_B)`` (the
        paper's Algorithm 2). W, the step and the trajectory of W are
        unchanged (gauge invariance); off by default.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax import lora_muon
      >>> params = {'lora_a': jax.random.normal(jax.random.key(0), (16, 2)),
      ...           'lora_b': jnp.zeros((2, 8))}
      >>> opt = lora_muon(learning_rate=0.1)
      >>> state = opt.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent
      on the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026.

    .. warning::
      Unlike ``optax.contrib.muon`` there is no ``sqrt(fan_out/fan_in)`` shape
      factor and no bias correction, and the weight decay is the split rule,
      not ``optax.add_decayed_weights`` (which would decay ``A Bᵀ`` by
      ``(1 − λη)²``).
    """
    _direction.check_method(method)
    if _is_number(weight_decay) and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay=}")
    if _is_number(learning_rate) and _is_number(weight_decay):
        if float(learning_rate) * float(weight_decay) >= 1.0:  # type: ignore[arg-type]
            raise ValueError(
                "the split weight decay needs weight_decay * learning_rate < 1 "
                f"(s = sqrt(1 - λη)), got {weight_decay=} * {learning_rate=}"
            )
    if fallback is not None and fallback_learning_rate is not None:
        raise ValueError("pass either `fallback` or `fallback_learning_rate`, not both")
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule
    factor_tx = optax.chain(
        scale_by_lora_muon(
            momentum,
            nesterov=nesterov,
            method=method,
            mu_dtype=mu_dtype,
            lora_scale=lora_scale,
            pair_rule=rule,
            dimension_numbers=dimension_numbers,
        ),
        scale_by_split_weight_decay(learning_rate, weight_decay),
    )
    if rebalance:
        factor_tx = _rebalance.with_gauge_rebalancing(
            factor_tx, pair_rule=rule, dimension_numbers=dimension_numbers
        )
    if fallback is None:
        fallback = optax.adamw(
            learning_rate=learning_rate
            if fallback_learning_rate is None
            else fallback_learning_rate,
            weight_decay=fallback_weight_decay,
            mu_dtype=mu_dtype,
        )

    def labels(params: optax.Params) -> Any:
        return _pairs.lora_param_labels(params, pair_rule=rule, dimension_numbers=dimension_numbers)

    return optax.partition(
        {"lora": factor_tx, "fallback": _with_standard_promotion(fallback)}, labels
    )
