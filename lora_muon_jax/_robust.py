"""The robust form of the LoRA-Muon direction, where the Gram form is not exact.

Taken (inside one ``lax.cond`` per call, for every stack of equal-shape pairs
at once, each stack keeping its fast result unless it needs this one) where an r×r bound
says the fast Gram form may be inexact: ill-conditioned or rank-deficient
factors or momenta, Grams out of range. Matmul-only, and certified: each half
of the step has spectral norm at most η/2 up to rounding.

1. every tall input is divided by its largest entry (the direction does not
   depend on M's scale and R scales as 1/c), so nothing under- or overflows;
2. each factor is whitened by shifted CholeskyQR stages and a polar finish,
   L's columns are cleared of B's null space, and ``B L`` is certified a partial
   isometry (~0 on B's numerical null space);
3. ``X = M L`` is brought near orthogonal by Newton–Schulz steps on the tall
   matrix (no squaring of its condition number);
4. a polar finish on the exact Gram of that X and an isometry certificate on
   the Gram of what was formed: ``U = Y C Lᵀ``;
5. each half shrunk by ``0.5 u κ_est`` of its partner (u the unit roundoff): storing
   a U_A with entries ~1/σ_min(B) rounds U_A Bᵀ by ~u κ(B), which no certificate of
   the r×r work can see (<= 5e-4 at κ = 1e4 in float32, nothing at κ <= 100).

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
# Storing a direction U_A with entries ~1/σ_min(B) rounds U_A Bᵀ by ~u κ(B) (u the unit
# roundoff): the float64 oracle's own U_A rounded to float32 has halves up to 1 + u κ/20,
# this form's up to 1 + u κ/4 (measured, κ(B) = 1e4…1e6, r = 16…64). Each half is shrunk
# by ``margin · u · κ_est`` (κ_est >= κ, at most r^{1/8} above), so it stays <= η/2.
ROBUST_REPRESENTATION_MARGIN = 0.5


# The whitening stages' carry: the tall q's, the product R of the roots so far, R's gain
# on the factor's null space.
_Carry = tuple[list[jax.Array], list[jax.Array], list[jax.Array]]


def _whiteners(
    factors: Sequence[tuple[jax.Array, bool]],
) -> list[tuple[jax.Array, jax.Array]]:
    """``L`` (r×r) per factor with ``f L`` a partial isometry: shifted CholeskyQR and a filter.

    Each stage takes the Gram of the current tall ``q`` (``q = f`` at first),
    ``R = (Ĝ + εI)^{-1/2}`` and moves on to ``q R``; a stage lifts the
    smallest singular values by up to ε^{-1/2} while amplifying the null
    space of f by no more than that. The last Gram goes through the
    contraction filter, so the singular values of ``f L`` are at most 1,
    1 − O(τ) on the directions f resolves and near 0 on its numerical null
    space. Any such L serves: ``msign(M L) Lᵀ`` does not depend on the basis.

    ``f L ≈ 0`` does not make L's *columns* free of f's null space, and there
    the stages' product ``R`` has its largest gain ``c = Π ε_k^{-1/2} ‖G_k‖_F^{-1/2}``
    (exactly, as G_k ≈ 0 there): the filter's r×r rounding, multiplied by c,
    would leave L with a null-space part that ``M L`` mixes into the step. It is
    removed in f's own coordinates, where the subtraction is exact to the rounding
    of L: with ``K = I − F G F`` (the filtered-out directions of the last stage,
    ``F G F = YᵀY`` for ``Y = q F``), ``N̂ = R K / c`` is orthonormal on f's null
    space and ``L ← L − N̂ N̂ᵀ L``. The certificate comes last, on the Gram of ``f L``
    formed from f itself (the chain ``q = f R`` drifts from ``f R`` by ~1e-3 at
    κ(f) = 1e6).

    ``factors`` holds ``(f, rank_first)`` of any shapes: the tall products
    run per factor, every r×r stage once for all of them (``batched``). Returns
    ``(L, keep)`` per factor: ``keep = 1 − 0.5 u κ_est(f)`` (at least 0.5), the
    factor by which the partner's half is shrunk (``ROBUST_REPRESENTATION_MARGIN``).
    """
    flags = [rf for _, rf in factors]

    def stage(
        qs: Sequence[jax.Array], carry: _Carry | None, eps: float, grams: Sequence[jax.Array] = ()
    ) -> _Carry:
        def root(g: jax.Array, *prev: jax.Array) -> tuple[jax.Array, ...]:
            x, scale = _polar.inverse_sqrt_normalized(g, "gram", eps=eps)
            r = x * scale[..., None, None]
            gain = scale * eps**-0.5  # R's gain where Ĝ = 0: f's null space
            return (r, r, gain) if not prev else (r, mm(prev[0], r), prev[1] * gain)

        grams = grams or [_polar.gram(q, rank_first=rf) for q, rf in zip(qs, flags, strict=True)]
        if carry is None:
            outs = batched(root, [(g,) for g in grams])
        else:
            outs = batched(root, list(zip(grams, carry[1], carry[2], strict=True)))
        return (
            [times(q, r, rf) for q, (r, _, _), rf in zip(qs, outs, flags, strict=True)],
            [l for _, l, _ in outs],
            [c for _, _, c in outs],
        )

    first, *rest = ROBUST_FACTOR_SHIFTS
    grams0 = [_polar.gram(f, rank_first=rf) for f, rf in factors]
    carry = stage([f for f, _ in factors], None, first, grams0)
    if rest and all(eps == rest[0] for eps in rest):
        # Equal shifts: one rolled loop over the stages (a smaller program, same steps).
        def body(carry: _Carry, _: None) -> tuple[_Carry, None]:
            return stage(carry[0], carry, rest[0]), None

        carry, _ = jax.lax.scan(body, carry, None, length=len(rest))
    else:
        for eps in rest:
            carry = stage(carry[0], carry, eps)
    qs, ls, gains = carry

    def clean(g: jax.Array, r: jax.Array, c: jax.Array) -> tuple[jax.Array]:
        # L = R F, then f's null space out of its columns: K = I − F G F (the last
        # stage's filtered-out directions), N̂ = R K / c.
        f = _polar.polar_finish(g, ROBUST_FACTOR_TAU)
        l = mm(r, f)
        k = _polar._eye_like(g) - _polar._sym(mm(f, mm(g, f)))
        safe_c = jnp.where(c > 0, c, 1.0)[..., None, None]
        n_hat = jnp.where(c[..., None, None] > 0, mm(r, k) / safe_c, 0.0)
        return (l - mm(n_hat, mm(_polar._mT(n_hat), l)),)

    cleaned = batched(
        clean,
        [
            (_polar.gram(q, rank_first=rf), r, c)
            for q, r, c, rf in zip(qs, ls, gains, flags, strict=True)
        ],
    )
    # Certify on the Gram of f L as formed from f itself: ‖f L‖₂ <= 1 up to that
    # product's rounding (the stages' chain q = f R drifts from f R by more).
    ys = [times(f, l, rf) for (f, rf), (l,) in zip(factors, cleaned, strict=True)]

    def certify(g: jax.Array, l: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        # κ_est = (λ_max(S) λ_max(LᵀL))^{1/2}, each within r^{1/8} above (sharp norms): the
        # condition number of what f resolves, so κ_est >= κ.
        l = mm(l, _polar.isometry_certificate(g))
        _, t_s, _ = _polar.normalize_psd(s, sharp=True)
        _, t_l, _ = _polar.normalize_psd(mm(_polar._mT(l), l), sharp=True)
        unit = jnp.finfo(l.dtype).eps / 2
        return l, 1.0 - jnp.minimum(ROBUST_REPRESENTATION_MARGIN * unit * jnp.sqrt(t_s * t_l), 0.5)

    certified = batched(
        certify,
        [
            (_polar.gram(y, rank_first=rf), l, g0)
            for y, (l,), g0, rf in zip(ys, cleaned, grams0, flags, strict=True)
        ],
    )
    return [(l, keep) for l, keep in certified]


def _robust_polars(items: Sequence[tuple[jax.Array, bool, jax.Array]]) -> list[jax.Array]:
    """``≈ msign(M L) Lᵀ`` per ``(M, rank_first, L)``, every singular value of msign at most 1.

    Tall products per item, every r×r step once for all items (``batched``).
    """
    flags = [rf for _, rf, _ in items]
    xs = []
    for mu, rf, l in items:
        x = times(mu, l, rf)
        t = jnp.trace(_polar.gram(x, rank_first=rf), axis1=-2, axis2=-1)
        # X within the rounding of its own product (‖X‖_F <= u √r ‖M‖_F ‖L‖_F: M orthogonal
        # to the partner's span up to rounding) is zero: msign of noise would be a full step
        # in a random direction. M is unit-scaled and L bounded, so nothing overflows.
        mu_sq = jnp.sum(jnp.square(mu.astype(x.dtype)), axis=(-2, -1))
        noise_sq = (
            (jnp.finfo(x.dtype).eps / 2) ** 2 * l.shape[-1] * mu_sq * jnp.sum(l * l, (-2, -1))
        )
        nonzero = (t >= _polar.tiny(t.dtype)) & (t > noise_sq)
        safe_t = jnp.where(nonzero, t, 1.0)
        xs.append(x * jnp.where(nonzero, jax.lax.rsqrt(safe_t), 0.0)[..., None, None])

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
    whitened = _whiteners(
        [
            f
            for (a, _, b, _, _, _), p in zip(scaled, pairs, strict=True)
            for f in ((a, p.a_rank_first), (b, p.b_rank_first))
        ]
    )
    ls = [l for l, _ in whitened]
    keep = [k[..., None, None] for _, k in whitened]
    us = _robust_polars(
        [
            item
            for i, ((_, _, _, _, mu_a, mu_b), p) in enumerate(zip(scaled, pairs, strict=True))
            for item in ((mu_a, p.a_rank_first, ls[2 * i + 1]), (mu_b, p.b_rank_first, ls[2 * i]))
        ]
    )
    # R_B scales as 1/c_B: U_A = msign(M_A L̂_B) L̂_Bᵀ / c_B (shrunk by B's margin).
    return [
        (
            us[2 * i] * (keep[2 * i + 1] / c_b[..., None, None]),
            us[2 * i + 1] * (keep[2 * i] / c_a[..., None, None]),
        )
        for i, (_, c_a, _, c_b, _, _) in enumerate(scaled)
    ]
