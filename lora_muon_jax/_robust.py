"""The robust form of the LoRA-Muon direction, where the Gram form is not exact.

Taken (inside a ``lax.cond``, per stack of equal-shape pairs) where an r×r bound
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

import jax
import jax.numpy as jnp

from lora_muon_jax import _polar
from lora_muon_jax._factors import FactorPair, dtype_of, mm, times, unit_scaled

# Robust form: damping of the first factor root (relative to ‖S‖_F), the
# filters' τ for the factor whitening and the polar finish, and the Newton–Schulz
# steps (the first five minimax quintics of the inverse-root schedule: they lift
# the smallest singular values ~1300×, the float32 rounding floor of a
# rank-deficient M R stays below the polar filter's τ).
ROBUST_FACTOR_SHIFTS = (1e-2, 1e-2, 1e-2)
ROBUST_FACTOR_TAU = 1e-5
ROBUST_POLAR_TAU = 1e-5
ROBUST_NEWTON_SCHULZ = _polar.GRAM_INV_SQRT_COEFFS[:4]


def _whitener(f: jax.Array, rank_first: bool) -> jax.Array:
    """``L`` (r×r) with ``f L`` a partial isometry: shifted CholeskyQR with a contraction filter.

    Each stage takes the Gram of the current tall ``q`` (``q = f`` at first),
    ``R = (Ĝ + εI)^{-1/2}`` and moves on to ``q R``; a stage lifts the
    smallest singular values by up to ε^{-1/2} while amplifying the null
    space of f by no more than that. The last Gram goes through the
    contraction filter, so the singular values of ``f L`` are at most 1,
    1 − O(τ) on the directions f resolves and near 0 on its numerical null
    space. Any such L serves: ``msign(M L) Lᵀ`` does not depend on the basis.
    """
    l = None
    q = f
    for eps in ROBUST_FACTOR_SHIFTS:
        x, scale = _polar.inverse_sqrt_normalized(
            _polar.gram(q, rank_first=rank_first), "gram", eps=eps
        )
        r = x * scale[..., None, None]
        q = times(q, r, rank_first)
        l = r if l is None else mm(l, r)
    assert l is not None
    f = _polar.polar_finish(_polar.gram(q, rank_first=rank_first), ROBUST_FACTOR_TAU)
    # Certify on the Gram of the f L actually formed: ‖f L‖₂ <= 1.
    y = times(q, f, rank_first)
    return mm(mm(l, f), _polar.isometry_certificate(_polar.gram(y, rank_first=rank_first)))


def _robust_polar(mu: jax.Array, rank_first: bool, l: jax.Array) -> jax.Array:
    """``≈ msign(M L) Lᵀ`` with every singular value of ``msign`` part at most 1."""
    x = times(mu, l, rank_first)
    t = jnp.trace(_polar.gram(x, rank_first=rank_first), axis1=-2, axis2=-1)
    safe_t = jnp.where(t >= _polar.tiny(t.dtype), t, 1.0)
    x = x * jnp.where(t >= _polar.tiny(t.dtype), jax.lax.rsqrt(safe_t), 0.0)[..., None, None]
    eye = _polar._eye_like(l)
    for a, b, c in ROBUST_NEWTON_SCHULZ:  # σ ↦ aσ + bσ³ + cσ⁵ on X's singular values
        h = _polar.gram(x, rank_first=rank_first)
        x = times(x, a * eye + b * h + c * mm(h, h), rank_first)
    f = _polar.polar_finish(_polar.gram(x, rank_first=rank_first), ROBUST_POLAR_TAU)
    y = times(x, f, rank_first)
    c = _polar.isometry_certificate(_polar.gram(y, rank_first=rank_first))
    return times(y, mm(c, _polar._mT(l)), rank_first)


@jax.named_scope("robust_form")
def robust_directions(p: FactorPair) -> tuple[jax.Array, jax.Array]:
    dtype = dtype_of(p)
    a, c_a = unit_scaled(p.a, dtype)
    b, c_b = unit_scaled(p.b, dtype)
    mu_a, _ = unit_scaled(p.mu_a, dtype)  # the direction does not depend on M's scale
    mu_b, _ = unit_scaled(p.mu_b, dtype)
    l_a = _whitener(a, p.a_rank_first)
    l_b = _whitener(b, p.b_rank_first)
    # R_B scales as 1/c_B: U_A = msign(M_A L̂_B) L̂_Bᵀ / c_B.
    u_a = _robust_polar(mu_a, p.a_rank_first, l_b) / c_b[..., None, None]
    u_b = _robust_polar(mu_b, p.b_rank_first, l_a) / c_a[..., None, None]
    return u_a, u_b
