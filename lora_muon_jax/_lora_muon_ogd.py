"""LoRA-Muon-OGD: LoRA-Muon with a non-interference constraint for continual finetuning.

For every LoRA pair ``W = W_pre + α A Bᵀ`` (``A: m×r``, ``B: n×r``) and
orthonormal bases ``U (m×k)``, ``V (n×k)`` of directions earlier tasks rely on,
the step solves LoRA-Muon's split trust-region problem with one more constraint,

    min ⟨G_W, ΔW⟩  s.t.  ‖α ΔA Bᵀ‖₂ ≤ η/2,  ‖α A ΔBᵀ‖₂ ≤ η/2,  Uᵀ ΔW V = 0,
    ΔW = α (ΔA Bᵀ + A ΔBᵀ),

by alternating primal steps and dual ascent on the multiplier ``Λ (k×k)``. The
constraint shifts the gradient, ``G_W → G_W + U Λ Vᵀ``, i.e. the factor momenta
``M_A → M_A + U Λ̃ (VᵀB)``, ``M_B → M_B + V Λ̃ᵀ (UᵀA)`` with ``Λ̃ = α Λ``; for
``j = 1 … J``

    ΔA⁽ʲ⁾ = −(η/2α) msign(M_A⁽ʲ⁾ R_B) R_B,      ΔB⁽ʲ⁾ = −(η/2α) msign(M_B⁽ʲ⁾ R_A) R_A,
    Λ̃⁽ʲ⁾ = Λ̃⁽ʲ⁻¹⁾ + σ ν⁽ʲ⁾ · Uᵀ ΔW⁽ʲ⁾ V / η,

``R_X = (XᵀX)^{-1/2}``. The primal steps are LoRA-Muon's own direction
(``lora_muon_direction``, Gram form) on shifted momenta, so with ``k = 0`` the
step *is* LoRA-Muon's, bit for bit. ``σ`` (``dual_step_size``) is
dimensionless: ``ν⁽ʲ⁾`` is the mean singular value of the whitened shifted
momenta, ``(‖M_A⁽ʲ⁾R_B‖_* + ‖M_B⁽ʲ⁾R_A‖_*) / 2r`` (computed as
``⟨M, msign(M R) R⟩``, no extra products), and ``Uᵀ ΔW V / η`` is the constraint
residual in units of the step radius. In the blog post's notation
``σ_Λ = σ ν / η`` (units: gradient per unit of W).

Beyond LoRA-Muon's work, each dual step costs four k×r tall products (``UᵀA``,
``VᵀB`` once; ``UᵀΔA``, ``VᵀΔB`` per step), two m×k×r expansions and k×k work;
``G_W`` is never formed. Every primal step is a full LoRA-Muon direction, so a
step costs about ``J`` LoRA-Muon directions; Λ̃ is warm-started across steps
(kept in the state), which makes ``J = 1`` an Arrow–Hurwicz primal–dual method.

Bases live in the optimizer state with a fixed capacity ``num_bases`` per
pair (unused columns are zero); ``ogd_bases_from_delta`` computes a finished
task's top-k singular directions of ``ΔW = A Bᵀ − A₀ B₀ᵀ`` from 2r×2r work, and
``update_ogd_bases`` appends them (re-orthonormalising the union) or replaces
the bases in any optimizer state that contains this transform.

Reference: F. L. Cesista, "LoRA-Muon-OGD", blog post, 2026-06-25
(leloykun.github.io/ponder/lora-muon-ogd), built on Cesista, Crowson, Simal,
Biderman, "LoRA-Muon: Spectral Steepest Descent on the Low-Rank Manifold",
arXiv:2606.12921, 2026, and the dense Muon-OGD of Lu et al., arXiv:2605.08949.
The post's "equivalently" line for ΔB writes ``G_B S_B^{-1/2}``; the line above
it (and the derivation) give ``G_B S_A^{-1/2}``, which is what is used here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _base, _checks, _direction, _lora_muon, _pairs, _scales
from lora_muon_jax._direction import FactorPair, Method
from lora_muon_jax._ogd_bases import ScaleByLoRAMuonOGDState
from lora_muon_jax._ogd_direction import (
    DEFAULT_DUAL_STEP_SIZE,
    DEFAULT_DUAL_STEPS,
    Constraint,
    ogd_directions,
)
from lora_muon_jax._pairs import DimensionNumbersArg, LoRAPair, PairRule

F32 = jnp.float32


def _stacked_units(method: Method) -> Callable[[list[FactorPair]], list[tuple[jax.Array, ...]]]:
    def units(views: list[FactorPair]) -> list[tuple[jax.Array, ...]]:
        return _lora_muon._stacked_directions(views, method)

    return units


def _pair_shapes(p: LoRAPair) -> tuple[int, int, int, int]:
    """``(N, m, n, r)`` of a pair's math layout."""
    a = jax.ShapeDtypeStruct(p.a_shape, F32)
    b = jax.ShapeDtypeStruct(p.b_shape, F32)
    a_view, b_view = jax.eval_shape(
        lambda x, y: (_pairs.to_math_layout(x, p, "a"), _pairs.to_math_layout(y, p, "b")), a, b
    )
    return a_view.shape[0], a_view.shape[1], b_view.shape[1], a_view.shape[2]


# ---------------------------------------------------------------- transforms


def scale_by_lora_muon_ogd(
    momentum: float | jax.Array = 0.9,
    *,
    num_bases: int,
    dual_steps: int = DEFAULT_DUAL_STEPS,
    dual_step_size: float | jax.Array = DEFAULT_DUAL_STEP_SIZE,
    warm_start: bool = True,
    primal_average: bool = True,
    nesterov: bool = False,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: _scales.LoRAScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum plus the LoRA-Muon-OGD direction, per factor pair (no learning rate).

    Per pair, ``M ← β M + (1 − β) G``, then ``dual_steps`` primal solves on
    the shifted momenta ``M_A + U Λ̃ VᵀB``, ``M_B + V Λ̃ᵀ UᵀA`` (LoRA-Muon's
    direction, ``D = msign(M R) R / 2α``), each followed by the dual step
    ``Λ̃ ← Λ̃ + σ ν Uᵀ ΔW V / η``; returns the last primal direction. Scaling
    by ``−η`` gives a step whose halves have spectral norm η/2 on W and whose
    block ``Uᵀ ΔW V`` is driven to zero by the dual ascent (exactly zero only
    in the limit; ``state.residual`` reports ``‖Uᵀ ΔW V‖_F / η``).

    The bases start empty (zero columns: no constraint, the step is
    LoRA-Muon's); add them with ``update_ogd_bases``. With ``num_bases=0``
    this transform *is* ``scale_by_lora_muon`` (same code path, bit for bit).

    Args:
      momentum: EMA rate β in [0, 1) (as ``scale_by_lora_muon``).
      num_bases: k ≥ 0, the capacity of each pair's bases (columns of U, V).
        Unused columns are zero and cost the same as used ones.
      dual_steps: J ≥ 1, primal solves (LoRA-Muon directions) per step: the
        step costs about J times LoRA-Muon's direction.
      dual_step_size: σ ≥ 0, **dimensionless**: a residual ``Uᵀ ΔW V`` of
        size η moves Λ by σ times ν, the step's first-order gain per unit of
        η/2 (``(⟨M_A, D_A⟩ + ⟨M_B, D_B⟩)/2r``, at Λ = 0 the mean singular
        value of the whitened momenta). Within one step from Λ = 0 the
        residual contracts geometrically for σ ≲ 1 on well-conditioned
        momenta; warm-started through training on rank-deficient momenta,
        σ = 0.003–0.01 protected past tasks best in our experiment and
        σ ≥ 0.05 did worse than no constraint (docs/lora_muon_ogd.md). Tune
        it with the learning rate. A traced σ is allowed
        (``inject_hyperparams``).
      warm_start: keep Λ̃ across steps (default). Off: every step starts from
        Λ̃ = 0 (J must then be larger to reach the same residual).
      primal_average: return the mean of the J primal iterates (default; it
        stays in each half's trust region and meets the constraint where the
        last iterate cannot: the dual is nonsmooth on rank-deficient momenta)
        or the last iterate (the blog post's step). Same cost.
      nesterov: Nesterov momentum.
      method: ``"gram"`` or ``"paper"`` (LoRA-Muon's ``METHODS``).
      mu_dtype: momentum dtype (default: the parameters'); math is float32.
      lora_scale: α in ``W = W_pre + α A Bᵀ`` (as ``scale_by_lora_muon``).
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).
      allow_no_pairs: accept a tree without any LoRA pair.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params``; state ``ScaleByLoRAMuonOGDState``; updates in float32
      (float64 for float64 factors).
    """
    name = "scale_by_lora_muon_ogd"
    _direction.check_method(method)
    num_bases = _checks.check_int(name, "num_bases", num_bases, 0)
    dual_steps = _checks.check_int(name, "dual_steps", dual_steps, 1)
    _checks.check_static(name, "dual_step_size", dual_step_size, "nonnegative")
    _checks.check_static(name, "lora_scale", lora_scale, "positive")
    plain = _lora_muon._lora_muon_pair_directions(method, lora_scale)

    def init_extra(pairs: list[LoRAPair]) -> tuple[Any, ...]:
        u, v, dual, residual = {}, {}, {}, {}
        for p in pairs:
            n_batch, m, n, _ = _pair_shapes(p)
            key = str(p.name)
            u[key] = jnp.zeros((n_batch, m, num_bases), F32)
            v[key] = jnp.zeros((n_batch, n, num_bases), F32)
            dual[key] = jnp.zeros((n_batch, num_bases, num_bases), F32)
            residual[key] = jnp.zeros((n_batch,), F32)
        return u, v, dual, residual

    def direction(
        pairs: list[LoRAPair],
        factors: list[jax.Array],
        momenta: list[jax.Array],
        extra: tuple[Any, ...],
    ) -> tuple[dict[int, jax.Array], tuple[Any, ...]]:
        if num_bases == 0:  # no constraint: LoRA-Muon's own code path
            out, _ = plain(pairs, factors, momenta, ())
            return out, extra
        u, v, dual, residual = extra

        def view(p: LoRAPair) -> FactorPair:
            a, a_rank_first = _pairs.to_matrix_view(factors[p.a_index], p, "a")
            b, b_rank_first = _pairs.to_matrix_view(factors[p.b_index], p, "b")
            mu_a, _ = _pairs.to_matrix_view(momenta[p.a_index], p, "a")
            mu_b, _ = _pairs.to_matrix_view(momenta[p.b_index], p, "b")
            return FactorPair(a, b, mu_a, mu_b, a_rank_first, b_rank_first)

        keys = [str(p.name) for p in pairs]
        constraints = [
            Constraint(u[k], v[k], dual[k] if warm_start else jnp.zeros_like(dual[k])) for k in keys
        ]
        directions, new_duals, residuals = ogd_directions(
            [view(p) for p in pairs],
            constraints,
            _stacked_units(method),
            dual_steps,
            dual_step_size,
            primal_average,
        )
        out: dict[int, jax.Array] = {}
        new_dual, new_residual = dict(dual), dict(residual)
        for p, key, (d_a, d_b), lam, res in zip(
            pairs, keys, directions, new_duals, residuals, strict=True
        ):
            half = _scales.half_step(lora_scale, p)
            for index, d, role in ((p.a_index, d_a, "a"), (p.b_index, d_b, "b")):
                out[index] = _pairs.from_matrix_view(d * half.astype(d.dtype), p, role)  # type: ignore[arg-type]
            new_dual[key] = lam.astype(F32)
            new_residual[key] = res.astype(F32)
        return out, (u, v, new_dual, new_residual)

    return _base.scale_by_pair_direction(
        direction,
        name=name,
        full_optimizer="lora_muon_ogd(...)",
        state_type=ScaleByLoRAMuonOGDState,
        init_extra=init_extra,
        momentum=momentum,
        nesterov=nesterov,
        mu_dtype=mu_dtype,
        pair_rule=pair_rule,
        dimension_numbers=dimension_numbers,
        allow_no_pairs=allow_no_pairs,
        check_pairs=_scales.pair_scale_checker(lora_scale, f"{name}.init"),
    )


def lora_muon_ogd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    num_bases: int,
    dual_steps: int = DEFAULT_DUAL_STEPS,
    dual_step_size: float | jax.Array = DEFAULT_DUAL_STEP_SIZE,
    warm_start: bool = True,
    primal_average: bool = True,
    momentum: float | jax.Array = 0.9,
    nesterov: bool = False,
    weight_decay: float | jax.Array = 0.0,
    method: Method = "gram",
    mu_dtype: Any = None,
    lora_scale: _scales.LoRAScale = 1.0,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Muon-OGD (Cesista, 2026): LoRA-Muon that keeps ``Uᵀ ΔW V = 0`` for past tasks.

    Per LoRA pair ``W = W_pre + α A Bᵀ`` (found by tree structure, as
    ``lora_muon``), with bases ``U (m×k)``, ``V (n×k)`` held in the state:

        min ⟨G_W, ΔW⟩  s.t.  ‖α ΔA Bᵀ‖₂ ≤ η/2,  ‖α A ΔBᵀ‖₂ ≤ η/2,  Uᵀ ΔW V = 0,

    solved by J alternating primal (LoRA-Muon on ``M + constraint shift``) and
    dual-ascent steps on Λ (see ``scale_by_lora_muon_ogd``), then LoRA-Muon's
    split weight decay ``A ← s A + ΔA / s`` (``s = √(1 − λη)``). Non-LoRA
    leaves go to ``fallback`` (default AdamW, as ``lora_muon``).

    Workflow: train task 1 (no bases yet: exactly LoRA-Muon); at its end,
    ``bases = ogd_bases_from_delta(params, params_at_task_start, k)`` and
    ``opt_state = update_ogd_bases(opt_state, bases)``; train task 2; repeat.

    Hyperparameters:
      * ``learning_rate`` η: LoRA-Muon's spectral-norm radius on W (each half
        η/2); start from LoRA-Muon's best η.
      * ``num_bases`` k: the capacity per pair; the union of all past tasks'
        directions must fit (``update_ogd_bases`` raises otherwise).
      * ``dual_steps`` J and ``dual_step_size`` σ (dimensionless): see
        ``scale_by_lora_muon_ogd``; cost ≈ J LoRA-Muon directions per step.
      * ``weight_decay`` λ: **default 0 here** (``lora_muon``: 0.01): decay
        shrinks all of ``A Bᵀ``, the protected block ``Uᵀ W V`` included, so it
        undoes past tasks at rate λη per step whatever the constraint.

    Args:
      learning_rate: η ≥ 0, a float or an optax schedule.
      num_bases: k ≥ 0 (0: exactly ``lora_muon``).
      dual_steps: J ≥ 1.
      dual_step_size: σ ≥ 0, dimensionless.
      warm_start: keep Λ across steps.
      primal_average: step along the mean of the J primal iterates.
      momentum: EMA rate β in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: λ ≥ 0, split rule, λη < 1.
      method: ``"gram"`` or ``"paper"``.
      mu_dtype: momentum dtype (default: the parameters'); math is float32.
      lora_scale: α > 0, a number or ``f(pair_name) -> float``.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).
      fallback: the transformation for non-LoRA leaves.
      fallback_learning_rate: AdamW learning rate for non-LoRA leaves.
      fallback_weight_decay: AdamW weight decay for non-LoRA leaves.
      allow_no_pairs: accept a tree with no LoRA pair.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax import lora_muon_ogd, ogd_bases_from_delta, update_ogd_bases
      >>> start = {'lora_a': jax.random.normal(jax.random.key(0), (16, 2)),
      ...          'lora_b': jnp.zeros((2, 8))}
      >>> opt = lora_muon_ogd(0.1, num_bases=2)
      >>> state = opt.init(start)
      >>> grads = jax.tree.map(jnp.ones_like, start)
      >>> updates, state = opt.update(grads, state, start)   # task 1: LoRA-Muon
      >>> params = optax.apply_updates(start, updates)
      >>> state = update_ogd_bases(state, ogd_bases_from_delta(params, start, 2))
      >>> updates, state = opt.update(grads, state, params)  # task 2: constrained

    References:
      F. L. Cesista, `LoRA-Muon-OGD <https://leloykun.github.io/ponder/lora-muon-ogd>`_,
      blog post, 2026. Cesista, Crowson, Simal, Biderman, `LoRA-Muon
      <https://arxiv.org/abs/2606.12921>`_, 2026.

    .. warning::
      The constraint is met by dual ascent: after J steps the residual is
      small, not zero (``state.residual``); the second-order term
      ``α ΔA ΔBᵀ`` of the factor update and weight decay are not constrained.
    """
    name = "lora_muon_ogd"
    _direction.check_method(method)
    if not callable(learning_rate):
        _checks.check_static(name, "learning_rate", learning_rate, "nonnegative")
    _checks.check_static(name, "momentum", momentum, "momentum")
    _checks.check_static(name, "weight_decay", weight_decay, "nonnegative")
    _base.check_decay_fraction(name, learning_rate, weight_decay)
    factor_tx = optax.chain(
        scale_by_lora_muon_ogd(
            momentum,
            num_bases=num_bases,
            dual_steps=dual_steps,
            dual_step_size=dual_step_size,
            warm_start=warm_start,
            primal_average=primal_average,
            nesterov=nesterov,
            method=method,
            mu_dtype=mu_dtype,
            lora_scale=lora_scale,
            pair_rule=pair_rule,
            dimension_numbers=dimension_numbers,
            allow_no_pairs=True,  # checked on the whole tree by fallback_partition
        ),
        _lora_muon.scale_by_split_weight_decay(learning_rate, weight_decay),
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
