"""The LoRA-Muon direction of a factor pair: pure array math, no optax.

For ``W = W_pre + A Bᵀ`` with ``A: (m, r)``, ``B: (n, r)`` and momenta
``M_A: (m, r)``, ``M_B: (n, r)``, the paper's Algorithm 1 moves along

    U_A = msign(M_A R_B) R_B,    U_B = msign(M_B R_A) R_A,
    R_A = (AᵀA)^{-1/2},          R_B = (BᵀB)^{-1/2},

and steps ``ΔA = -(η/2) U_A``, ``ΔB = -(η/2) U_B``. Each half of the induced
tangent step has unit spectral norm: ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1``, and never
more (the trust region): where a direction cannot be resolved in floating
point it shrinks, it never grows.

Two ways to compute it (``method``):

* ``"gram"`` (default). For full-column-rank ``M R``,
  ``msign(M R) R = M K`` with ``K = R (R P R)^{-1/2} R = (S # P)^{-1}``
  (``S = BᵀB``, ``P = M_AᵀM_A``, ``#`` the matrix geometric mean): three tall
  products per factor (two Grams and ``M K``), everything else r×r. The Gram
  of ``M R`` squares its condition number, so this *fast form* is used only
  where an r×r bound says it is exact to float32 rounding: every Gram in
  range and ``λ_min`` of each normalised r×r Gram above
  ``1 / FAST_MAX_INVERSE_EIGENVALUE``. Otherwise the pair's stack takes the
  *robust form* of ``_robust`` (inside one ``lax.cond`` per call, so it costs
  nothing when unused; its r×r chains batched across all stacks): inputs
  scaled to unit magnitude, factors whitened by shifted CholeskyQR,
  Newton–Schulz on the tall whitened momentum, certified polar finishes —
  each half provably at most η/2 (docs/numerics.md).
* ``"paper"``: Algorithm 1 literally, with the paper's Table 2 inverse root
  and Table 1 msign (8 Newton–Schulz steps on the m×r product), on inputs
  scaled to unit magnitude.

Both are matmul-only (no QR, eigh or SVD). Every r×r inverse root of every
pair passed in one call runs in one batched chain (grouped by r), so a
model's adapters share one chain instead of one per adapter.

Reference: Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest
Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from lora_muon_jax import _polar, _robust, _stacking
from lora_muon_jax._factors import (
    FactorPair,
    dtype_of,
    mm,
    tall,
    times_symmetric,
    unit_scaled,
)

Method = Literal["gram", "paper"]
# One registry: validates `method` everywhere and documents each value.
METHODS: dict[str, str] = {
    "gram": (
        "Gram form: U_A = M_A (BᵀB # M_AᵀM_A)^{-1}, 3 tall products per factor, r×r work "
        "in one batched chain; a robust form (shifted CholeskyQR whitening, tall "
        "Newton–Schulz, certified polar finish) takes over where an r×r bound says the "
        "Gram form is inexact."
    ),
    "paper": (
        "The paper's Algorithm 1 literally: Table 2 inverse roots (7 steps, "
        "ε = 1e-5, γ = 1.001) and Table 1 msign (8 steps on the m×r product)."
    ),
}

_HIGHEST = jax.lax.Precision.HIGHEST

# ---------------------------------------------------------------- constants
# Fast form gate. A float32 Gram carries rounding δ ≈ 1e-7 relative to its norm;
# an inverse root then errs by about δ/λ̂ in the direction of a normalised
# eigenvalue λ̂, and the step's halves by half of that. The fast form runs only
# where every 1/λ̂ (bounded above within r^{1/4} by ‖Z⁴‖_F^{1/2}, Z the root) is
# below this bound, i.e. where that error stays below ~1e-4 (measured:
# benchmarks/numerics.py); the condition number of M R it admits is ~√bound.
# The fast roots' 6-step schedule (GRAM_FAST_INV_SQRT_COEFFS) resolves only singular
# values >= 5e-3 and relies on this bound: a root it leaves unresolved has an
# eigenvalue >= 200 > √bound, so the gate sends that stack to the robust form.
FAST_MAX_INVERSE_EIGENVALUE = 1e4
# Every Gram's largest diagonal entry must lie in [tiny^0.8, tiny^-0.8] of the
# compute dtype (float32: [1.4e-31, 7e30]) for the fast form: its products of
# factor entries, roots and scalars then neither underflow nor overflow.
FAST_RANGE_EXPONENT = 0.8


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {sorted(METHODS)}, got {method!r}. "
            + "; ".join(f"{k!r}: {v}" for k, v in METHODS.items())
        )


def _batched(
    fn: Callable[[jax.Array], tuple[jax.Array, ...]], mats: Sequence[jax.Array]
) -> list[tuple[jax.Array, ...]]:
    """``fn`` on many (N_i, r_i, r_i) stacks: one call per (r, dtype, sharding)."""
    return _stacking.batched(fn, [(m,) for m in mats])


def _max_diag(g: jax.Array) -> jax.Array:
    return jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)


def _in_range(g: jax.Array, x: jax.Array) -> jax.Array:
    """Per matrix: the Gram g of x is finite, and x is zero or g's diagonal in the fast range.

    A zero Gram of a nonzero x (entries below ~1e-19 in float32 underflow when
    squared) is out of range: the robust form rescales x first.
    """
    lo = _polar.tiny(g.dtype) ** FAST_RANGE_EXPONENT
    d = _max_diag(g)
    finite = jnp.all(jnp.isfinite(g), axis=(-2, -1))
    # A sum (not a max): on a mesh its partial sums join the Grams' one all-reduce.
    x_is_zero = ~(jnp.sum(jnp.abs(x), axis=(-2, -1), dtype=g.dtype) > 0)
    return finite & ((x_is_zero & (d == 0)) | ((d >= lo) & (d <= 1.0 / lo)))


def _inverse_eigenvalue_bound(z: jax.Array) -> jax.Array:
    """``‖Z⁴‖_F^{1/2}`` for ``Z = (P̂ + εI)^{-1/2}``: in ``[1, r^{1/4}] / (λ̂_min + ε)``."""
    z2 = mm(z, z)
    z4 = mm(z2, z2)
    return jnp.sqrt(jnp.sqrt(jnp.sum(z4 * z4, axis=(-2, -1))))


# ---------------------------------------------------------------- gram method


@jax.named_scope("gram_form")
def _gram_directions(
    pairs: Sequence[FactorPair],
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    dtypes = [dtype_of(p) for p in pairs]
    # Tall products 1-4 per pair: S_A, S_B, P_A, P_B.
    grams = [
        [
            _polar.gram(x, rank_first=rf).astype(dt)
            for x, rf in zip(tall(p), (p.a_rank_first, p.b_rank_first) * 2, strict=True)
        ]
        for p, dt in zip(pairs, dtypes, strict=True)
    ]

    def root(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # The 6-step schedule: the gate below rejects every root it does not resolve.
        x, scale = _polar.inverse_sqrt_normalized(stack, "gram", fast_gate=True)
        return x, scale, _inverse_eigenvalue_bound(x)

    # Chain 1: S_A^{-1/2}, S_B^{-1/2} ≈ scale · X for every pair.
    roots_s = _batched(root, [g for gs in grams for g in gs[:2]])
    # Chain 2: Q_A = X_SB P̂_A X_SB, Q_B = X_SA P̂_B X_SA, with P̂ = P / max diag(P).
    inner = []
    for i, gs in enumerate(grams):
        x_sa, x_sb = roots_s[2 * i][0], roots_s[2 * i + 1][0]
        for x_s, g_p in ((x_sb, gs[2]), (x_sa, gs[3])):
            d = _max_diag(g_p)
            p_hat = g_p / jnp.where(d > 0, d, 1.0)[..., None, None]
            inner.append(_polar._sym(mm(x_s, mm(p_hat, x_s))))
    roots_q = _batched(root, inner)

    fasts, all_ks = [], []
    for i, p in enumerate(pairs):
        (x_sa, t_sa, e_sa), (x_sb, t_sb, e_sb) = roots_s[2 * i], roots_s[2 * i + 1]
        (x_qa, t_qa, e_qa), (x_qb, t_qb, e_qb) = roots_q[2 * i], roots_q[2 * i + 1]
        bound = FAST_MAX_INVERSE_EIGENVALUE
        fast = jnp.all(
            jnp.stack([_in_range(g, x) for g, x in zip(grams[i], tall(p), strict=True)]), axis=0
        )
        for e in (e_sa, e_sb, e_qa, e_qb):
            fast = fast & (e <= bound)
        # K_A = R_B Q_A^{-1/2} R_B = t_SB (t_QA/√d_PA) X_SB X_QA X_SB.
        ks = []
        for g_p, x_s, t_s, x_q, t_q in (
            (grams[i][2], x_sb, t_sb, x_qa, t_qa),
            (grams[i][3], x_sa, t_sa, x_qb, t_qb),
        ):
            d = _max_diag(g_p)
            inv_sqrt_d = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0)
            # Symmetric exactly (it is in exact arithmetic), so M K takes times_symmetric.
            k = _polar._sym(mm(x_s, mm(x_q, x_s))) * (t_q * inv_sqrt_d * t_s)[..., None, None]
            ks.append(jnp.where(jnp.isfinite(k), k, 0.0))
        fasts.append(jnp.all(fast))  # a stack takes one form for all its pairs
        all_ks.append(tuple(ks))

    def fast_forms(arrays, all_ks):
        return [
            (
                times_symmetric(mu_a.astype(dt), ks[0], p.a_rank_first),
                times_symmetric(mu_b.astype(dt), ks[1], p.b_rank_first),
            )
            for (_, _, mu_a, mu_b), ks, dt, p in zip(arrays, all_ks, dtypes, pairs, strict=True)
        ]

    def some_robust(arrays, all_ks, fasts):
        # One branch for the whole call: the robust form of every stack with its
        # r×r chains batched across stacks (compile time nearly flat in the number
        # of shapes); a stack whose fast form is exact keeps it.
        robust = _robust.robust_directions_many(
            [
                FactorPair(a, b, mu_a, mu_b, p.a_rank_first, p.b_rank_first)
                for (a, b, mu_a, mu_b), p in zip(arrays, pairs, strict=True)
            ]
        )
        return [
            tuple(jnp.where(f, u_fast, u_robust) for u_fast, u_robust in zip(fs, rs, strict=True))
            for f, fs, rs in zip(fasts, fast_forms(arrays, all_ks), robust, strict=True)
        ]

    arrays = [tall(p) for p in pairs]
    results = jax.lax.cond(
        jnp.all(jnp.stack(fasts)),
        lambda arrays, all_ks, fasts: fast_forms(arrays, all_ks),
        some_robust,
        arrays,
        all_ks,
        fasts,
    )
    # An r×r result (replicated on a mesh): keys the split of the stacked results.
    return results, _stacking.replicated_anchor([r[0] for r in roots_s])


# ---------------------------------------------------------------- paper method


@jax.named_scope("paper_form")
def _paper_directions(
    pairs: Sequence[FactorPair],
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    # Inputs scaled to unit magnitude first (the direction is invariant to M's
    # scale and R scales as 1/c), so no Gram under- or overflows.
    scaled = [[unit_scaled(x, dtype_of(p)) for x in tall(p)] for p in pairs]
    roots = _batched(
        lambda s: _polar.inverse_sqrt_normalized(s, "paper"),
        [
            _polar.gram(f, rank_first=rf)
            for xs, p in zip(scaled, pairs, strict=True)
            for (f, _), rf in zip(xs[:2], (p.a_rank_first, p.b_rank_first), strict=True)
        ],
    )
    out = []
    for i, p in enumerate(pairs):
        (_, c_a), (_, c_b), (mu_a, _), (mu_b, _) = scaled[i]
        (x_sa, t_sa), (x_sb, t_sb) = roots[2 * i], roots[2 * i + 1]
        directions = []
        # msign(M R) R with R = (t/c) X: msign is scale invariant, so use X.
        # Rank-first (N, r, m) views hold Mᵀ: (msign(M R) R)ᵀ = R msign(R Mᵀ).
        for mu, rank_first, x_s, t_s, c_s in (
            (mu_a, p.a_rank_first, x_sb, t_sb, c_b),
            (mu_b, p.b_rank_first, x_sa, t_sa, c_a),
        ):
            if rank_first:
                u = mm(x_s, _polar.matrix_sign(mm(x_s, mu)))
            else:
                u = mm(_polar.matrix_sign(mm(mu, x_s)), x_s)
            directions.append(u * (t_s / c_s)[..., None, None])
        out.append((directions[0], directions[1]))
    return out, _stacking.replicated_anchor([r[0] for r in roots])


_DIRECTION_FNS = {"gram": _gram_directions, "paper": _paper_directions}


def lora_muon_directions(
    pairs: Sequence[FactorPair], method: Method = "gram"
) -> list[tuple[jax.Array, jax.Array]]:
    """Unit LoRA-Muon directions for many pairs, r×r work batched across pairs.

    Args:
      pairs: ``FactorPair`` per pair: 3-axis views with one leading batch
        axis, ``(N, m, r)`` or, with ``*_rank_first``, ``(N, r, m)`` (flax's
        ``lora_b (r, out)`` needs no transpose).
      method: ``"gram"`` or ``"paper"``.

    Returns:
      ``(U_A, U_B)`` per pair in the views' shapes and orientations, float32
      (float64 where an input is float64).
    """
    return directions_and_anchor(pairs, method)[0]


def directions_and_anchor(
    pairs: Sequence[FactorPair], method: Method = "gram"
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """``lora_muon_directions`` plus an r×r array it computed (replicated on a mesh).

    The anchor keys ``_stacking.runtime_offsets`` when the caller splits stacks
    of pairs back (a runtime value that needs no communication).
    """
    check_method(method)
    return _DIRECTION_FNS[method](pairs)


def lora_muon_direction(
    a: jax.Array,
    b: jax.Array,
    mu_a: jax.Array,
    mu_b: jax.Array,
    *,
    method: Method = "gram",
) -> tuple[jax.Array, jax.Array]:
    """Unit LoRA-Muon direction of one factor pair (math layout, batched).

    ``U_A = msign(M_A R_B) R_B``, ``U_B = msign(M_B R_A) R_A`` with
    ``R_X = (XᵀX)^{-1/2}``; the paper's step is ``ΔA = -(η/2) U_A``,
    ``ΔB = -(η/2) U_B``, and ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1`` (never more than
    1 + 1e-3; directions float32 cannot resolve shrink). A zero factor has
    inverse root 0 (with ``B = 0``, ``U_A = 0`` and ``U_B`` is well defined).

    Args:
      a: ``A``, shape (..., m, r). For flax's ``lora_a (in, r)`` pass it as is.
      b: ``B``, shape (..., n, r). For flax's ``lora_b (r, out)`` pass ``lora_bᵀ``.
      mu_a: momentum (or gradient) of ``a``, same shape as ``a``.
      mu_b: momentum (or gradient) of ``b``, same shape as ``b``.
      method: ``"gram"`` (default) or ``"paper"``; see ``METHODS``.

    Returns:
      ``(U_A, U_B)`` with the shapes of ``a`` and ``b``, float32 (float64
      where an input is float64).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon_direction
      >>> ka, kb, kg = jax.random.split(jax.random.key(0), 3)
      >>> a = jax.random.normal(ka, (64, 4)); b = jax.random.normal(kb, (32, 4))
      >>> g_w = jax.random.normal(kg, (64, 32))
      >>> u_a, u_b = lora_muon_direction(a, b, g_w @ b, g_w.T @ a)
      >>> round(float(jnp.linalg.norm(u_a @ b.T, ord=2)), 3)
      1.0
    """
    check_method(method)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"factors need at least 2 axes, got {a.shape=} {b.shape=}")
    if mu_a.shape != a.shape or mu_b.shape != b.shape:
        raise ValueError(
            f"momenta must match their factors: {a.shape=} {mu_a.shape=} {b.shape=} {mu_b.shape=}"
        )
    if a.shape[-1] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            "a (..., m, r) and b (..., n, r) need the same rank r and batch axes, "
            f"got {a.shape=} {b.shape=}"
        )
    batch = a.shape[:-2]
    flat = [x.reshape((-1, *x.shape[-2:])) for x in (a, b, mu_a, mu_b)]
    ((u_a, u_b),) = lora_muon_directions([FactorPair(flat[0], flat[1], flat[2], flat[3])], method)
    return u_a.reshape((*batch, *a.shape[-2:])), u_b.reshape((*batch, *b.shape[-2:]))
