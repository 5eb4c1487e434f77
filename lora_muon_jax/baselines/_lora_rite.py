"""Simplified LoRA-RITE core: a QR-based, gauge-invariant factor step (a baseline).

Per LoRA pair ``W = W_pre + A Bᵀ`` with EMA momenta ``M_A, M_B`` and thin QR
factorisations ``A = Q_A R_A``, ``B = Q_B R_B``:

    ΔA = −η' msign(M_A R_B⁻¹) R_B⁻ᵀ,   ΔB = −η' msign(M_B R_A⁻¹) R_A⁻ᵀ

Since ``R_Bᵀ R_B = BᵀB``, ``R_B⁻¹ = (BᵀB)^{-1/2} Uᵀ`` for an orthogonal U, so
``msign(M_A R_B⁻¹) R_B⁻ᵀ = msign(M_A (BᵀB)^{-1/2}) (BᵀB)^{-1/2}``: this is
LoRA-Muon's step at η = 2η' (LoRA-Muon gets it with matmuls only, no QR, no
SVD, and a pseudo-inverse for rank-deficient factors). This core keeps only the
unmagnified-preconditioner part of LoRA-RITE: no second moments, no escaped-mass
correction. It needs full-rank factors (``B = 0`` gives a singular ``R_B``);
msign here is an exact thin SVD.

Reference: Yen, Si, Liu, Chen, Hsieh, Dhillon, Kumar, "LoRA Done RITE: Robust
Invariant Transformation Equilibration for LoRA Optimization",
arXiv:2410.20625, 2024 (simplified as in Cesista et al., arXiv:2606.12921).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _base, _deprecation, _pairs
from lora_muon_jax.baselines._dense_muon import scale_by_decoupled_step

F32 = jnp.float32

_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleByLoRARiteState(NamedTuple):
    """State of ``scale_by_lora_rite``: one momentum per factor."""

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of factor gradients: params' tree and shapes, dtype mu_dtype


def _svd_msign(x: jax.Array) -> jax.Array:
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    return jnp.matmul(u, vt, precision=_HIGHEST)


def lora_rite_direction(
    a: jax.Array, b: jax.Array, mu_a: jax.Array, mu_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(msign(M_A R_B⁻¹) R_B⁻ᵀ, msign(M_B R_A⁻¹) R_A⁻ᵀ)`` with ``X = Q_X R_X`` (thin QR).

    Args:
      a: ``A``, shape (..., m, r), full column rank.
      b: ``B``, shape (..., n, r), full column rank.
      mu_a: momentum of ``a``, same shape.
      mu_b: momentum of ``b``, same shape.

    Returns:
      The unit directions (float32); ``‖D_A Bᵀ‖₂ = ‖A D_Bᵀ‖₂ = 1``.
    """
    a, b, mu_a, mu_b = (x.astype(F32) for x in (a, b, mu_a, mu_b))
    r_a = jnp.linalg.qr(a, mode="r")
    r_b = jnp.linalg.qr(b, mode="r")

    def one(mu: jax.Array, r: jax.Array) -> jax.Array:
        # X R = M  ->  X = M R⁻¹;   Y Rᵀ = msign(X)  ->  Y = msign(X) R⁻ᵀ.
        x = jax.lax.linalg.triangular_solve(r, mu, left_side=False, lower=False)
        return jax.lax.linalg.triangular_solve(
            r, _svd_msign(x), left_side=False, lower=False, transpose_a=True
        )

    return one(mu_a, r_b), one(mu_b, r_a)


def scale_by_lora_rite(
    momentum: float | jax.Array = 0.9,
    *,
    mu_dtype: Any = None,
    pair_rule: _pairs.PairRule | None = None,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
) -> optax.GradientTransformationExtraArgs:
    """EMA momentum and the RITE-core direction per pair (no learning rate).

    Every leaf must belong to a LoRA pair; scaling by ``-η'`` gives the step.

    Args:
      momentum: EMA rate β.
      mu_dtype: momentum dtype (default: the parameters'); math is float32.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
    """

    def direction(
        pairs: list[_pairs.LoRAPair],
        factors: list[jax.Array],
        momenta: list[jax.Array],
        extra: tuple[Any, ...],
    ) -> tuple[dict[int, jax.Array], tuple[Any, ...]]:
        out: dict[int, jax.Array] = {}
        for p in pairs:
            a, b = _pairs.math_views(factors, p)
            mu_a, mu_b = _pairs.math_views(momenta, p)
            d_a, d_b = lora_rite_direction(a, b, mu_a, mu_b)
            for index, d, role in ((p.a_index, d_a, "a"), (p.b_index, d_b, "b")):
                out[index] = _pairs.from_math_layout(d, p, role)  # type: ignore[arg-type]
        return out, extra

    return _base.scale_by_pair_direction(
        direction,
        name="scale_by_lora_rite",
        full_optimizer="lora_rite(...)",
        state_type=ScaleByLoRARiteState,
        cast_to_grads=True,
        momentum=momentum,
        mu_dtype=mu_dtype,
        pair_rule=pair_rule,
        dimension_numbers=dimension_numbers,
    )


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.9,
    weight_decay: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    pair_rule: _pairs.PairRule | None = None,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Simplified LoRA-RITE core on every LoRA pair, AdamW on the other leaves.

        ΔA = −η' msign(M_A R_B⁻¹) R_B⁻ᵀ,   ΔB = −η' msign(M_B R_A⁻¹) R_A⁻ᵀ,
        X ← (1 − λη') X + ΔX

    η' = ``learning_rate`` is the spectral norm of each tangent half ``ΔA Bᵀ``,
    ``A ΔBᵀ``: ``lora_rite(η/2)`` steps like ``lora_muon(η)`` (without decay).

    Args:
      learning_rate: η', a float or an optax schedule.
      momentum: EMA rate β.
      weight_decay: λ, decoupled, per factor.
      mu_dtype: momentum dtype.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).
      fallback: transformation for non-LoRA leaves (default ``optax.adamw``).
      fallback_learning_rate: AdamW learning rate for non-LoRA leaves.
      fallback_weight_decay: AdamW weight decay for non-LoRA leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax.baselines import lora_rite
      >>> ka, kb = jax.random.split(jax.random.key(0))
      >>> params = {'lora_a': jax.random.normal(ka, (8, 2)),
      ...           'lora_b': jax.random.normal(kb, (2, 6))}
      >>> opt = lora_rite(0.05)
      >>> updates, _ = opt.update(params, opt.init(params), params)
      >>> round(float(jnp.linalg.norm(updates['lora_a'] @ params['lora_b'], ord=2)), 4)
      0.05
    """
    factor_tx = optax.chain(
        scale_by_lora_rite(
            momentum, mu_dtype=mu_dtype, pair_rule=pair_rule, dimension_numbers=dimension_numbers
        ),
        scale_by_decoupled_step(learning_rate, weight_decay),
    )
    return _base.fallback_partition(
        factor_tx,
        _base.pair_labels(pair_rule, dimension_numbers),
        learning_rate=learning_rate,
        fallback=fallback,
        fallback_learning_rate=fallback_learning_rate,
        fallback_weight_decay=fallback_weight_decay,
        mu_dtype=mu_dtype,
    )


__getattr__ = _deprecation.renamed(
    __name__, {"ScaleByLoraRiteState": ("ScaleByLoRARiteState", ScaleByLoRARiteState)}
)
