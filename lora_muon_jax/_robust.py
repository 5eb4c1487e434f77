"""The robust form of the LoRA-Muon direction, where the Gram form is not exact.

Taken (inside one ``lax.cond`` per call, for every stack of equal-shape pairs
at once, each stack keeping its fast result unless it needs this one) where an r×r bound
says the fast Gram form may be inexact: ill-conditioned or rank-deficient
factors or momenta, Grams out of range. Matmul-only, and certified: each half
of the step has spectral norm at most η/2 up to rounding.

1. every tall input is divided by its largest entry (the direction does not
   depend on M's scale and R scales as 1/c), so nothing under- or overflows;
2. each factor is whitened by shifted CholeskyQR stages and a certified polar
   finish (``B L`` a partial isometry, ~0 on B's numerical null space);
3. ``X = M L`` is brought near orthogonal by Newton–Schulz steps on the tall
   matrix (no squaring of its condition number);
4. a polar finish on the exact Gram of that X and an isometry certificate on
   the Gram of what was formed: ``U = Y C Lᵀ``.

Measured accuracy and cost: docs/numerics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lora_muon_jax import _polar
from lora_muon_jax._factors import FactorPair, dtype_of, mm, times, unit_scaled
from lora_muon_jax._stacking import batched

# Robust form: damping of the first factor root (relative to ‖S‖_F), the
# filters' τ for the factor whitening and the polar finish, and the Newton–Schulz
# steps (the first five minimax quintics of the inverse-root schedule: they lift
# the smallest singular values ~1300×, the float32 rounding floor of a
# rank-deficient M R stays below the polar filter's τ).
ROBUST_FACTOR_SHIFTS = (1e-2, 1e-2, 1e-2)
ROBUST_FACTOR_TAU = 1e-5
ROBUST_POLAR_TAU = 1e-5
ROBUST_NEWTON_SCHULZ = _polar.GRAM_INV_SQRT_COEFFS[:4]


def _whiteners(factors: Sequence[tuple[jax.Array, bool]]) -> list[jax.Array]:
    """``L`` (r×r) per factor with ``f L`` a partial isometry: shifted CholeskyQR and a filter.

    Each stage takes the Gram of the current tall ``q`` (``q = f`` at first),
    ``R = (Ĝ + εI)^{-1/2}`` and moves on to ``q R``; a stage lifts the
    smallest singular values by up to ε^{-1/2} while amplifying the null
    space of f by no more than that. The last Gram goes through the
    contraction filter, so the singular values of ``f L`` are at most 1,
    1 − O(τ) on the directions f resolves and near 0 on its numerical null
    space. Any such L serves: ``msign(M L) Lᵀ`` does not depend on the basis.

    ``factors`` holds ``(f, rank_first)`` of any shapes: the tall products
    run per factor, every r×r stage once for all of them (``batched``).
    """
    flags = [rf for _, rf in factors]

    def stage(
        qs: Sequence[jax.Array], ls: Sequence[jax.Array] | None, eps: float
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        def root(g: jax.Array, *l: jax.Array) -> tuple[jax.Array, ...]:
            x, scale = _polar.inverse_sqrt_normalized(g, "gram", eps=eps)
            r = x * scale[..., None, None]
            return (r, r if not l else mm(l[0], r))

        grams = [_polar.gram(q, rank_first=rf) for q, rf in zip(qs, flags, strict=True)]
        if ls is None:
            outs = batched(root, [(g,) for g in grams])
        else:
            outs = batched(root, list(zip(grams, ls, strict=True)))
        return (
            [times(q, r, rf) for q, (r, _), rf in zip(qs, outs, flags, strict=True)],
            [l for _, l in outs],
        )

    first, *rest = ROBUST_FACTOR_SHIFTS
    qs, ls = stage([f for f, _ in factors], None, first)
    if rest and all(eps == rest[0] for eps in rest):
        # Equal shifts: one rolled loop over the stages (a smaller program, same steps).
        def body(
            carry: tuple[list[jax.Array], list[jax.Array]], _: None
        ) -> tuple[tuple[list[jax.Array], list[jax.Array]], None]:
            return stage(carry[0], carry[1], rest[0]), None

        (qs, ls), _ = jax.lax.scan(body, (qs, ls), None, length=len(rest))
    else:
        for eps in rest:
            qs, ls = stage(qs, ls, eps)
    fins = batched(
        lambda g: (_polar.polar_finish(g, ROBUST_FACTOR_TAU),),
        [(_polar.gram(q, rank_first=rf),) for q, rf in zip(qs, flags, strict=True)],
    )
    # Certify on the Gram of the f L actually formed: ‖f L‖₂ <= 1.
    ys = [times(q, f, rf) for q, (f,), rf in zip(qs, fins, flags, strict=True)]
    certified = batched(
        lambda g, l, f: (mm(mm(l, f), _polar.isometry_certificate(g)),),
        [
            (_polar.gram(y, rank_first=rf), l, f)
            for y, l, (f,), rf in zip(ys, ls, fins, flags, strict=True)
        ],
    )
    return [l for (l,) in certified]


def _robust_polars(items: Sequence[tuple[jax.Array, bool, jax.Array]]) -> list[jax.Array]:
    """``≈ msign(M L) Lᵀ`` per ``(M, rank_first, L)``, every singular value of msign at most 1.

    Tall products per item, every r×r step once for all items (``batched``).
    """
    flags = [rf for _, rf, _ in items]
    xs = []
    for mu, rf, l in items:
        x = times(mu, l, rf)
        t = jnp.trace(_polar.gram(x, rank_first=rf), axis1=-2, axis2=-1)
        safe_t = jnp.where(t >= _polar.tiny(t.dtype), t, 1.0)
        xs.append(
            x * jnp.where(t >= _polar.tiny(t.dtype), jax.lax.rsqrt(safe_t), 0.0)[..., None, None]
        )

    def newton_schulz(xs: list[jax.Array], abc: jax.Array) -> tuple[list[jax.Array], None]:
        # σ ↦ aσ + bσ³ + cσ⁵ on X's singular values; one rolled loop over the steps.
        def poly(h: jax.Array) -> tuple[jax.Array]:
            a, b, c = (abc[i].astype(h.dtype) for i in range(3))
            return (a * _polar._eye_like(h) + b * h + c * mm(h, h),)

        ws = batched(
            poly, [(_polar.gram(x, rank_first=rf),) for x, rf in zip(xs, flags, strict=True)]
        )
        return [times(x, w, rf) for x, (w,), rf in zip(xs, ws, flags, strict=True)], None

    xs, _ = jax.lax.scan(newton_schulz, xs, jnp.asarray(ROBUST_NEWTON_SCHULZ))
    fins = batched(
        lambda h: (_polar.polar_finish(h, ROBUST_POLAR_TAU),),
        [(_polar.gram(x, rank_first=rf),) for x, rf in zip(xs, flags, strict=True)],
    )
    ys = [times(x, f, rf) for x, (f,), rf in zip(xs, fins, flags, strict=True)]
    finishes = batched(
        lambda g, l: (mm(_polar.isometry_certificate(g), _polar._mT(l)),),
        [
            (_polar.gram(y, rank_first=rf), l)
            for y, rf, (_, _, l) in zip(ys, flags, items, strict=True)
        ],
    )
    return [times(y, cl, rf) for y, (cl,), rf in zip(ys, finishes, flags, strict=True)]


@jax.named_scope("robust_form")
def robust_directions_many(pairs: Sequence[FactorPair]) -> list[tuple[jax.Array, jax.Array]]:
    """The robust ``(U_A, U_B)`` of every pair (stack), r×r work batched across all of them."""
    scaled = []
    for p in pairs:
        dtype = dtype_of(p)
        a, c_a = unit_scaled(p.a, dtype)
        b, c_b = unit_scaled(p.b, dtype)
        mu_a, _ = unit_scaled(p.mu_a, dtype)  # the direction does not depend on M's scale
        mu_b, _ = unit_scaled(p.mu_b, dtype)
        scaled.append((a, c_a, b, c_b, mu_a, mu_b))
    ls = _whiteners(
        [
            f
            for (a, _, b, _, _, _), p in zip(scaled, pairs, strict=True)
            for f in ((a, p.a_rank_first), (b, p.b_rank_first))
        ]
    )
    us = _robust_polars(
        [
            item
            for i, ((_, _, _, _, mu_a, mu_b), p) in enumerate(zip(scaled, pairs, strict=True))
            for item in ((mu_a, p.a_rank_first, ls[2 * i + 1]), (mu_b, p.b_rank_first, ls[2 * i]))
        ]
    )
    # R_B scales as 1/c_B: U_A = msign(M_A L̂_B) L̂_Bᵀ / c_B.
    return [
        (us[2 * i] / c_b[..., None, None], us[2 * i + 1] / c_a[..., None, None])
        for i, (_, c_a, _, c_b, _, _) in enumerate(scaled)
    ]
