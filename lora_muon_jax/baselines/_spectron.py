"""Spectron: factor-wise Muon on LoRA factors with a norm-adaptive step (a baseline).

Per LoRA pair ``W = W_pre + A Bᵀ`` (found by ``lora_muon_jax.find_lora_pairs``,
the same pairing as ``lora_muon``), with EMA momenta ``M_A, M_B``:

    ρ = η / (‖A‖₂ + ‖B‖₂ + 1),   A ← (1 − λη) A − ρ msign(M_A),   B ← (1 − λη) B − ρ msign(M_B)

The spectral norms come from power iteration on the r×r Grams ``AᵀA``, ``BᵀB``
(warm-started from the previous step's vectors, kept in the state). Unlike
LoRA-Muon the step is *not* invariant to the gauge ``(A, B) → (cA, B/c)``: the
induced ``ΔA Bᵀ = −ρ msign(M_A) Bᵀ`` scales like ``1/c``.

Reference: Spectron, arXiv:2602.12429 (as summarised in the LoRA-Muon paper,
Cesista, Crowson, Simal, Biderman, arXiv:2606.12921, 2026, which uses it as a
baseline). The decoupled factor decay ``(1 − λη)`` per factor is our choice: the
summary does not specify Spectron's weight decay.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _base, _checks, _pairs
from lora_muon_jax._polar import matrix_sign
from lora_muon_jax.baselines._dense_muon import scale_by_decoupled_step

F32 = jnp.float32

_HIGHEST = jax.lax.Precision.HIGHEST
# Power-iteration steps per optimizer step (warm-started, so a few suffice).
DEFAULT_POWER_ITERATIONS = 5


class ScaleBySpectronState(NamedTuple):
    """State of ``scale_by_spectron``."""

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of factor gradients: params' tree and shapes, dtype mu_dtype
    # Per pair: right singular vector estimates of A and B, float32 (N, r) each
    # (N = product of the pair's batch axes).
    power_vectors: tuple[tuple[jax.Array, jax.Array], ...]


def spectral_norm_power(
    x: jax.Array, v0: jax.Array, iterations: int = DEFAULT_POWER_ITERATIONS
) -> tuple[jax.Array, jax.Array]:
    """``‖X‖₂`` of ``X (N, m, r)`` by power iteration on ``XᵀX`` from ``v0 (N, r)``.

    Returns ``(sigma (N,), v (N, r))``; ``σ = sqrt(vᵀ XᵀX v)`` with v normalised
    (a lower bound that converges to ‖X‖₂ geometrically in ``(σ₂/σ₁)²``).
    """
    gram = jnp.einsum("nmi,nmj->nij", x, x, precision=_HIGHEST)

    def body(v: jax.Array, _: None) -> tuple[jax.Array, None]:
        w = jnp.einsum("nij,nj->ni", gram, v, precision=_HIGHEST)
        norm = jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True))
        return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v), None

    v, _ = jax.lax.scan(body, v0.astype(F32), None, length=iterations)
    rayleigh = jnp.einsum("ni,nij,nj->n", v, gram, v, precision=_HIGHEST)
    return jnp.sqrt(jnp.maximum(rayleigh, 0.0)), v


def _initial_vector(n: int, r: int) -> jax.Array:
    return jnp.full((n, r), 1.0 / r**0.5, F32)


def scale_by_spectron(
    momentum: float | jax.Array = 0.9,
    *,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    mu_dtype: Any = None,
    pair_rule: _pairs.PairRule | None = None,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EMA momentum and Spectron's direction ``D = msign(M) / (‖A‖₂ + ‖B‖₂ + 1)``.

    Scaling by ``-η`` gives Spectron's step ``−ρ msign(M)`` with
    ``ρ = η / (‖A‖₂ + ‖B‖₂ + 1)``. Every leaf must belong to a LoRA pair.

    Args:
      momentum: EMA rate β of the factor momenta.
      power_iterations: power-iteration steps per update (warm-started).
      mu_dtype: momentum dtype (default: the parameters'); math is float32.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
    """

    power_iterations = _checks.check_int(
        "scale_by_spectron", "power_iterations", power_iterations, 1
    )

    def init_extra(pairs: list[_pairs.LoRAPair]) -> tuple[Any, ...]:
        vectors = []
        for p in pairs:
            n = math.prod(p.batch_shape)  # batch axes anywhere, not only leading
            vectors.append((_initial_vector(n, p.rank), _initial_vector(n, p.rank)))
        return (tuple(vectors),)

    def direction(
        pairs: list[_pairs.LoRAPair],
        factors: list[jax.Array],
        momenta: list[jax.Array],
        extra: tuple[Any, ...],
    ) -> tuple[dict[int, jax.Array], tuple[Any, ...]]:
        (power_vectors,) = extra
        out: dict[int, jax.Array] = {}
        new_vectors = []
        for p, (v_a, v_b) in zip(pairs, power_vectors, strict=True):
            a, b = _pairs.math_views(factors, p)
            mu_a, mu_b = _pairs.math_views(momenta, p)
            norm_a, v_a = spectral_norm_power(a, v_a, power_iterations)
            norm_b, v_b = spectral_norm_power(b, v_b, power_iterations)
            new_vectors.append((v_a, v_b))
            rho = (1.0 / (norm_a + norm_b + 1.0))[:, None, None]
            for index, mu, role in ((p.a_index, mu_a, "a"), (p.b_index, mu_b, "b")):
                out[index] = _pairs.from_math_layout(rho * matrix_sign(mu), p, role)  # type: ignore[arg-type]
        return out, (tuple(new_vectors),)

    return _base.scale_by_pair_direction(
        direction,
        name="scale_by_spectron",
        full_optimizer="spectron(...)",
        state_type=ScaleBySpectronState,
        init_extra=init_extra,
        cast_to_grads=True,
        momentum=momentum,
        mu_dtype=mu_dtype,
        pair_rule=pair_rule,
        dimension_numbers=dimension_numbers,
    )


def spectron(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.9,
    weight_decay: float | jax.Array = 0.01,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    mu_dtype: Any = None,
    pair_rule: _pairs.PairRule | None = None,
    dimension_numbers: _pairs.DimensionNumbersArg = None,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Spectron on every LoRA pair, AdamW on the other leaves.

        ρ = η / (‖A‖₂ + ‖B‖₂ + 1),   X ← (1 − λη) X − ρ msign(M_X)   for X ∈ {A, B}

    η has LoRA-Muon's units only roughly: ``‖ΔA Bᵀ‖₂ ≤ ρ ‖B‖₂ < η``, and the step
    on W depends on how the product's scale is split between the factors.

    Args:
      learning_rate: η, a float or an optax schedule.
      momentum: EMA rate β.
      weight_decay: λ, decoupled, per factor (the product decays by ``(1 − λη)²``).
      power_iterations: power-iteration steps per update.
      mu_dtype: momentum dtype.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).
      fallback: transformation for non-LoRA leaves (default ``optax.adamw``).
      fallback_learning_rate: AdamW learning rate for non-LoRA leaves.
      fallback_weight_decay: AdamW weight decay for non-LoRA leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.baselines import spectron
      >>> params = {'lora_a': jnp.eye(4, 2), 'lora_b': jnp.eye(2, 3)}
      >>> opt = spectron(0.3, weight_decay=0.0)
      >>> state = opt.init(params)
      >>> updates, _ = opt.update(params, state, params)  # G = params
      >>> round(float(jnp.linalg.norm(updates['lora_a'], ord=2)), 4)  # 0.3 / (1 + 1 + 1)
      0.1
    """
    factor_tx = optax.chain(
        scale_by_spectron(
            momentum,
            power_iterations=power_iterations,
            mu_dtype=mu_dtype,
            pair_rule=pair_rule,
            dimension_numbers=dimension_numbers,
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
