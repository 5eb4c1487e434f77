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

from typing import Any, NamedTuple

import jax
import optax

from lora_muon_jax import (
    _base,
    _checks,
    _deprecation,
    _direction,
    _pairs,
    _rebalance,
    _scales,
    _stacking,
)
from lora_muon_jax._direction import FactorPair, Method
from lora_muon_jax._pairs import DimensionNumbersArg, LoRAPair, PairRule

LoRAScale = _scales.LoRAScale


class ScaleByLoRAMuonState(NamedTuple):
    """State of ``scale_by_lora_muon``: one momentum per factor, no second moments."""

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of factor gradients: the params' tree and shapes, dtype mu_dtype


class ScaleBySplitWeightDecayState(NamedTuple):
    """State of ``scale_by_split_weight_decay``."""

    count: jax.Array  # int32[], step index for the learning-rate schedule


def _stack_key(v: FactorPair) -> tuple[Any, ...]:
    # Views of equal shapes, dtypes and shardings (and orientation) are stacked.
    arrays = (v.a, v.b, v.mu_a, v.mu_b)
    return (
        *((x.shape[1:], x.dtype, _stacking.sharding_of(x)) for x in arrays),
        v.a_rank_first,
        v.b_rank_first,
    )


def _stacked_directions(views: list[FactorPair], method: Method) -> list[tuple[jax.Array, ...]]:
    """Unit directions of every pair, equal-shape pairs concatenated along the batch axis.

    The compiled step then has a fixed number of tall products per distinct
    shape, not per adapter.
    """
    stacked = _stacking.Stacked(views, lambda v: (v.a, v.b, v.mu_a, v.mu_b), _stack_key)
    groups = [
        FactorPair(a, b, mu_a, mu_b, v.a_rank_first, v.b_rank_first)
        for (a, b, mu_a, mu_b), v in zip(stacked.groups, stacked.meta, strict=True)
    ]
    results, anchor = _direction.directions_and_anchor(groups, method)
    # Keep XLA from fusing every per-leaf tail (slice, scale, decay) into the
    # stacked products: without it compile time grows ~3x and nothing runs faster.
    # The split's offsets are runtime values (``_stacking.runtime_offsets``), so
    # the per-leaf tails are one kernel for all equal-shape pairs.
    return stacked.split([jax.lax.optimization_barrier(r) for r in results], anchor)


def _lora_muon_pair_directions(method: Method, lora_scale: LoRAScale) -> _base.PairDirection:
    """The LoRA-Muon rule for ``scale_by_pair_direction``: ``D = msign(M R) R / (2α)``."""

    def direction(
        pairs: list[LoRAPair],
        factors: list[jax.Array],
        momenta: list[jax.Array],
        extra: tuple[Any, ...],
    ) -> tuple[dict[int, jax.Array], tuple[Any, ...]]:
        def view(p: LoRAPair) -> FactorPair:
            a, a_rank_first = _pairs.to_matrix_view(factors[p.a_index], p, "a")
            b, b_rank_first = _pairs.to_matrix_view(factors[p.b_index], p, "b")
            mu_a, _ = _pairs.to_matrix_view(momenta[p.a_index], p, "a")
            mu_b, _ = _pairs.to_matrix_view(momenta[p.b_index], p, "b")
            return FactorPair(a, b, mu_a, mu_b, a_rank_first, b_rank_first)

        out: dict[int, jax.Array] = {}
        for p, (u_a, u_b) in zip(
            pairs, _stacked_directions([view(p) for p in pairs], method), strict=True
        ):
            half = _scales.half_step(lora_scale, p)
            for index, u, role in ((p.a_index, u_a, "a"), (p.b_index, u_b, "b")):
                # The unit direction stays in the compute dtype (float32 for
                # half-precision factors): it can exceed float16's range where
                # η·D does not, so the cast comes after the learning rate.
                out[index] = _pairs.from_matrix_view(u * half.astype(u.dtype), p, role)  # type: ignore[arg-type]
        return out, extra

    return direction


def scale_by_lora_muon(
    momentum: float | jax.Array = 0.9,
    *,
    nesterov: bool = False,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: LoRAScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum plus the LoRA-Muon direction, per factor pair (no learning rate).

    For each pair, ``M ← β M + (1 − β) G`` on both factors (Nesterov: the
    direction uses ``β M + (1 − β) G``), then returns

        D_A = msign(M_A R_B) R_B / (2α),   D_B = msign(M_B R_A) R_A / (2α),

    so that ``‖α D_A Bᵀ‖₂ = ‖α A D_Bᵀ‖₂ = 1/2``: scaling by ``-η`` gives a step
    whose two tangent halves have spectral norm η/2 on W. No bias correction:
    the direction does not depend on the scale of M.

    Every leaf must belong to a LoRA pair (use ``lora_muon``, or
    ``optax.partition`` with ``lora_param_labels``, for mixed trees), and
    ``init`` on a tree without any pair raises unless ``allow_no_pairs``.

    Args:
      momentum: EMA rate β of the factor momenta, in [0, 1). A Python or
        NumPy number outside it (or NaN) raises here; a traced one (a jax
        array, ``optax.inject_hyperparams``) outside it makes that step a
        no-op: zero update, momenta unchanged.
      nesterov: use Nesterov momentum (off in the paper).
      method: ``"gram"`` (default; fast Gram form) or ``"paper"`` (Algorithm 1
        literally); see ``lora_muon_jax.METHODS``.
      mu_dtype: dtype of the momenta (default: the parameters' dtype). The math
        runs in float32 whatever this is.
      lora_scale: α in ``W = W_pre + α A Bᵀ`` (qwix: alpha/rank), a number or
        ``f(pair_name) -> float``; the step is divided by it so η stays a
        radius on W. It must be finite and > 0: a number is checked here, a
        callable's value for every pair at ``init`` (the error names the
        pair); a traced α that is not gives that pair a zero step. Under
        ``optax.inject_hyperparams`` a callable must be named in
        ``static_args=("lora_scale",)`` (inject_hyperparams calls every other
        callable as a schedule, with the step count).
      pair_rule: ``f(path: tuple[str, ...]) -> (group, "a" | "b") | None``;
        ``None`` means ``default_pair_rule``. Under ``optax.inject_hyperparams``
        name callables in ``static_args``.
      dimension_numbers: ``None`` (infer), a ``LoRADimensionNumbers`` or
        ``f(pair_name, a_shape, b_shape)``; see ``find_lora_pairs``.
      allow_no_pairs: accept a tree in which no LoRA pair is found (else
        ``init`` raises a ``ValueError`` listing its leaves).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` (and gradients of the params' shapes). Its updates are in
      float32 (float64 for float64 factors), whatever the factors' dtype: a
      unit direction can overflow float16 where ``η·D`` does not.
      ``scale_by_split_weight_decay`` (or ``optax.apply_updates``) casts back
      after scaling.
    """
    _direction.check_method(method)
    name = "scale_by_lora_muon"
    _checks.check_static(name, "lora_scale", lora_scale, "positive")
    return _base.scale_by_pair_direction(
        _lora_muon_pair_directions(method, lora_scale),
        name=name,
        full_optimizer="lora_muon(...)",
        state_type=ScaleByLoRAMuonState,
        momentum=momentum,
        nesterov=nesterov,
        mu_dtype=mu_dtype,
        pair_rule=pair_rule,
        dimension_numbers=dimension_numbers,
        allow_no_pairs=allow_no_pairs,
        check_pairs=_scales.pair_scale_checker(lora_scale, f"{name}.init"),
    )


def scale_by_split_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | jax.Array = 0.01,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale a LoRA direction by ``-η`` and apply the paper's split weight decay.

    With ``s = √(1 − λη)`` each factor moves to ``s A + ΔA / s`` where
    ``ΔA = -η D_A``: the update is ``-(η/s) D_A − (λη / (1 + s)) A``. The decay
    term is written as ``λη/(1+s)`` (equal to ``1 − s``) so it keeps its digits
    when λη is tiny. Then ``A'B'ᵀ = (1 − λη) ABᵀ + ΔA Bᵀ + A ΔBᵀ + ΔA ΔBᵀ/s²``.

    Python or NumPy numbers are checked here: η ≥ 0, λ ≥ 0, both finite and
    λη < 1 (a ``ValueError`` showing the values). Traced values (a schedule's
    η, jax arrays, ``optax.inject_hyperparams``) are checked at every step:
    a step with a negative or non-finite η or λ, or with λη ≥ 1, is a **zero
    update** — the factors are neither decayed nor moved, and ‖A Bᵀ‖ is
    unchanged (never the ~1/s-amplified step that λη → 1 would give). A valid
    λη is clipped to ``1 − 1e-6`` so float32 rounding keeps s ≥ 1e-3.

    Args:
      learning_rate: η ≥ 0, a float or an optax schedule.
      weight_decay: λ ≥ 0 with λη < 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
    """
    return _base.scale_by_scaled_step(
        learning_rate,
        weight_decay,
        rule="split",
        state_type=ScaleBySplitWeightDecayState,
        name="scale_by_split_weight_decay",
    )


def lora_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.9,
    nesterov: bool = False,
    weight_decay: float | jax.Array = 0.01,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: LoRAScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
    rebalance: bool = False,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Muon (Cesista et al., 2026): the paper's Algorithm 1 as an optax optimizer.

    Per LoRA pair ``W = W_pre + α A Bᵀ`` (found by tree structure, see
    ``find_lora_pairs``):

        M ← β M + (1 − β) G,   ΔA = -(η/2α) msign(M_A R_B) R_B,   ΔB = -(η/2α) msign(M_B R_A) R_A,
        A ← s A + ΔA / s,   B ← s B + ΔB / s,   R_X = (XᵀX)^{-1/2},   s = √(1 − λη).

    Every other leaf goes to ``fallback`` (default: ``optax.adamw`` with
    ``fallback_learning_rate`` and ``fallback_weight_decay``, run in float32
    for 16-bit leaves so its second moment cannot overflow). ``init`` warns
    once (``UserWarning``: how many leaves, which, at which learning rate)
    when leaves reach that default without a ``fallback_learning_rate``, and
    raises a ``ValueError`` when the tree has no LoRA pair at all (unless
    ``allow_no_pairs``).

    Checks: Python and NumPy hyperparameters are validated here (a
    ``ValueError`` naming the argument and showing the value): η ≥ 0, λ ≥ 0,
    λη < 1, β in [0, 1), α > 0, all finite. Traced ones (schedules, arrays,
    ``optax.inject_hyperparams``) cannot raise inside ``jit``; a step with an
    invalid one is a zero update of the factors (see
    ``scale_by_split_weight_decay`` and ``scale_by_lora_muon``), never a
    non-finite or amplified one. Gradients must have the parameters' shapes
    and every pair rank ≥ 1 and non-empty axes (a ``ValueError`` naming the
    path and the shapes).

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
      learning_rate: η ≥ 0, a float or an optax schedule.
      momentum: EMA rate β in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: λ ≥ 0, applied with the split rule; λη < 1.
      method: ``"gram"`` (default: the Gram form where an r×r bound says it
        is exact, a robust matmul-only form elsewhere; each half ≤ η/2·(1 + 1e-3)
        always, docs/numerics.md) or ``"paper"`` (Algorithm 1 with the paper's
        Tables 1–2); see ``lora_muon_jax.METHODS``.
      mu_dtype: momentum dtype (default: the parameters' dtype); math is float32.
      lora_scale: α > 0, a number or ``f(pair_name) -> float`` (e.g.
        ``lora_muon_jax.flax.nnx.lora_scale_fn(model)``). Under
        ``optax.inject_hyperparams`` pass ``static_args=("lora_scale",)`` for
        a callable: inject_hyperparams calls callables as schedules (with the
        step count), and ``lora_scale_fn``'s map then raises a ``TypeError``
        saying so.
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
        unchanged (gauge invariance); off by default. ``c`` is clipped per
        step to [√ε, 1/√ε] of the factors' dtype (``_rebalance.max_log_gauge``),
        so pairs more than 1/ε apart balance over a few steps.
      allow_no_pairs: accept a tree with no LoRA pair (every leaf then goes
        to the fallback); by default ``init`` raises, since that is almost
        always a naming or ``wrt=`` mistake.

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
    name = "lora_muon"
    if not callable(learning_rate):
        _checks.check_static(name, "learning_rate", learning_rate, "nonnegative")
    _checks.check_static(name, "momentum", momentum, "momentum")
    _checks.check_static(name, "weight_decay", weight_decay, "nonnegative")
    _base.check_decay_fraction(name, learning_rate, weight_decay)
    _checks.check_static(name, "lora_scale", lora_scale, "positive")
    factor_tx = optax.chain(
        scale_by_lora_muon(
            momentum,
            nesterov=nesterov,
            method=method,
            mu_dtype=mu_dtype,
            lora_scale=lora_scale,
            pair_rule=pair_rule,
            dimension_numbers=dimension_numbers,
            allow_no_pairs=True,  # checked on the whole tree by fallback_partition
        ),
        scale_by_split_weight_decay(learning_rate, weight_decay),
    )
    if rebalance:
        factor_tx = _rebalance.with_gauge_rebalancing(
            factor_tx, pair_rule=pair_rule, dimension_numbers=dimension_numbers
        )
    return _base.fallback_partition(
        factor_tx,
        _base.pair_labels(pair_rule, dimension_numbers),
        learning_rate=learning_rate,
        fallback=fallback,
        fallback_learning_rate=fallback_learning_rate,
        fallback_weight_decay=fallback_weight_decay,
        mu_dtype=mu_dtype,
        name=name,
        allow_no_pairs=allow_no_pairs,
        report_default_fallback=True,
    )


__getattr__ = _deprecation.renamed(
    __name__, {"ScaleByLoraMuonState": ("ScaleByLoRAMuonState", ScaleByLoRAMuonState)}
)
