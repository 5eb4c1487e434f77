"""The LoRA-Muon direction of a factor pair: pure array math, no optax.

For ``W = W_pre + A Bᵀ`` with ``A: (m, r)``, ``B: (n, r)`` and momenta
``M_A: (m, r)``, ``M_B: (n, r)``, the paper's Algorithm 1 moves along

    U_A = msign(M_A R_B) R_B,    U_B = msign(M_B R_A) R_A,
    R_A = (AᵀA)^{-1/2},          R_B = (BᵀB)^{-1/2},

and steps ``ΔA = -(η/2) U_A``, ``ΔB = -(η/2) U_B``. Each half of the induced
tangent step has unit spectral norm: ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1``.

Two ways to compute it (``method``):

* ``"gram"`` (default): for full-column-rank ``M R``,
  ``msign(M R) R = M K`` with ``K = R (R P R)^{-1/2} R = (S # P)^{-1}``
  (``S = BᵀB``, ``P = M_AᵀM_A``, ``#`` the matrix geometric mean), so the
  direction needs three tall products per factor (two Grams and ``M K``);
  everything else is r×r. The inverse roots use a stable Polar-Express
  iteration (see ``_polar``).
* ``"paper"``: Algorithm 1 literally, with the paper's Table 2 inverse root
  and Table 1 msign (8 Newton–Schulz steps on the m×r product).

Both are matmul-only. Every r×r inverse root of every pair passed in one call
runs in one batched chain (grouped by r), so a model's adapters share one
chain instead of one per adapter.

Reference: Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest
Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _polar

Method = Literal["gram", "paper"]
# One registry: validates `method` everywhere and documents each value.
METHODS: dict[str, str] = {
    "gram": (
        "Gram form: U_A = M_A (BᵀB # M_AᵀM_A)^{-1}; 3 tall products per factor, "
        "r×r work in one batched chain; as accurate as float32 eigh."
    ),
    "paper": (
        "The paper's Algorithm 1 literally: Table 2 inverse roots (7 steps, "
        "ε = 1e-5, γ = 1.001) and Table 1 msign (8 steps on the m×r product)."
    ),
}

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


class FactorPair(NamedTuple):
    """One pair in a 3-axis view: (N, m, r) — or (N, r, m) when ``*_rank_first``."""

    a: jax.Array
    b: jax.Array
    mu_a: jax.Array  # same shape and orientation as a
    mu_b: jax.Array  # same shape and orientation as b
    a_rank_first: bool = False
    b_rank_first: bool = False


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {sorted(METHODS)}, got {method!r}. "
            + "; ".join(f"{k!r}: {v}" for k, v in METHODS.items())
        )


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _times(x: jax.Array, k: jax.Array, rank_first: bool) -> jax.Array:
    """``x @ k`` in the math layout: ``x k`` for (N, m, r), ``kᵀ x`` for (N, r, m)."""
    return _mm(_polar._mT(k), x) if rank_first else _mm(x, k)


def _batched_inverse_sqrt(
    mats: Sequence[jax.Array], method: Method, *, pseudo: bool = False
) -> list[tuple[jax.Array, jax.Array]]:
    """``inverse_sqrt_normalized`` on many (N_i, r_i, r_i) stacks in one chain per r."""
    out: list[tuple[jax.Array, jax.Array] | None] = [None] * len(mats)
    # Grouped by r and, on explicit meshes, by sharding type: concatenating
    # differently sharded stacks is refused there (Auto meshes report none).
    by_rank: dict[tuple[int, object], list[int]] = {}
    for i, m in enumerate(mats):
        by_rank.setdefault((m.shape[-1], getattr(jax.typeof(m), "sharding", None)), []).append(i)
    for idx in by_rank.values():
        stacked = jnp.concatenate([mats[i] for i in idx], axis=0)
        x, scale = _polar.inverse_sqrt_normalized(stacked, method, pseudo=pseudo)
        offsets = [0]
        for i in idx:
            offsets.append(offsets[-1] + mats[i].shape[0])
        for j, i in enumerate(idx):
            lo, hi = offsets[j], offsets[j + 1]
            out[i] = (x[lo:hi], scale[lo:hi])
    return [o for o in out if o is not None]


def _max_diag(g: jax.Array) -> jax.Array:
    return jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)


def _gram_directions(pairs: Sequence[FactorPair]) -> list[tuple[jax.Array, jax.Array]]:
    # Tall products 1-4 per pair: S_A, S_B, P_A, P_B (each c² · G, c >= 1).
    grams = _polar.scaled_grams(
        [x for p in pairs for x in (p.a, p.b, p.mu_a, p.mu_b)],
        [rf for p in pairs for rf in (p.a_rank_first, p.b_rank_first) * 2],
    )
    factor_grams = [(grams[4 * i], grams[4 * i + 1]) for i in range(len(pairs))]
    momentum_grams = [(grams[4 * i + 2], grams[4 * i + 3]) for i in range(len(pairs))]
    # Chain 1: S_A^{-1/2}, S_B^{-1/2} for every pair ≈ scale · X / c; pseudo-inverse
    # roots, so a rank-deficient factor's null directions get 0, not ε^{-1/2}
    # (R appears twice in K: rounding noise there would be amplified ~ε^{-3/2}).
    roots_s = _batched_inverse_sqrt([g for fg in factor_grams for g, _ in fg], "gram", pseudo=True)
    # Chain 2: Q_A = R_B P̂_A R_B, Q_B = R_A P̂_B R_A, with P̂ = P / max diag(P).
    inner = []
    for i, (p_a, p_b) in enumerate(momentum_grams):
        x_sa, x_sb = roots_s[2 * i][0], roots_s[2 * i + 1][0]
        for x_s, (g_p, _) in ((x_sb, p_a), (x_sa, p_b)):
            d = _max_diag(g_p)
            p_hat = g_p / jnp.where(d > 0, d, 1.0)[..., None, None]
            inner.append(_polar._sym(_mm(x_s, _mm(p_hat, x_s))))
    roots_q = _batched_inverse_sqrt(inner, "gram")

    out = []
    for i, p in enumerate(pairs):
        (_, c_sa), (_, c_sb) = factor_grams[i]
        (g_pa, c_pa), (g_pb, c_pb) = momentum_grams[i]
        (x_sa, t_sa), (x_sb, t_sb) = roots_s[2 * i], roots_s[2 * i + 1]
        (x_qa, t_qa), (x_qb, t_qb) = roots_q[2 * i], roots_q[2 * i + 1]
        directions = []
        # U_A = M_A K_A, K_A = R_B Q_A^{-1/2} R_B = (t_SB/c_SB) (t_QA/√d_PA) X_SB X_QA X_SB
        for mu, rank_first, g_p, c_p, x_s, t_s, c_s, x_q, t_q in (
            (p.mu_a, p.a_rank_first, g_pa, c_pa, x_sb, t_sb, c_sb, x_qa, t_qa),
            (p.mu_b, p.b_rank_first, g_pb, c_pb, x_sa, t_sa, c_sa, x_qb, t_qb),
        ):
            d = _max_diag(g_p)
            inv_sqrt_d = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0) / c_p
            k_hat = _mm(x_s, _mm(x_q, x_s)) * (t_q * inv_sqrt_d)[..., None, None]
            scale = (t_s / c_s)[..., None, None]
            directions.append(_times(mu.astype(_F32), k_hat, rank_first) * scale)
        out.append((directions[0], directions[1]))
    return out


def _paper_directions(pairs: Sequence[FactorPair]) -> list[tuple[jax.Array, jax.Array]]:
    grams = _polar.scaled_grams(
        [x for p in pairs for x in (p.a, p.b)],
        [rf for p in pairs for rf in (p.a_rank_first, p.b_rank_first)],
    )
    factor_grams = [(grams[2 * i], grams[2 * i + 1]) for i in range(len(pairs))]
    roots = _batched_inverse_sqrt([g for fg in factor_grams for g, _ in fg], "paper")
    out = []
    for i, p in enumerate(pairs):
        (_, c_sa), (_, c_sb) = factor_grams[i]
        (x_sa, t_sa), (x_sb, t_sb) = roots[2 * i], roots[2 * i + 1]
        directions = []
        # msign(M R) R with R = (t/c) X: msign is scale invariant, so use X.
        # Rank-first (N, r, m) views hold Mᵀ: (msign(M R) R)ᵀ = R msign(R Mᵀ).
        for mu, rank_first, x_s, t_s, c_s in (
            (p.mu_a, p.a_rank_first, x_sb, t_sb, c_sb),
            (p.mu_b, p.b_rank_first, x_sa, t_sa, c_sa),
        ):
            mu = mu.astype(_F32)
            if rank_first:
                u = _mm(x_s, _polar.matrix_sign(_mm(x_s, mu)))
            else:
                u = _mm(_polar.matrix_sign(_mm(mu, x_s)), x_s)
            directions.append(u * (t_s / c_s)[..., None, None])
        out.append((directions[0], directions[1]))
    return out


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
      ``(U_A, U_B)`` per pair, float32, in the views' shapes and orientations.
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
    ``ΔB = -(η/2) U_B``, and ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1``. A zero factor has
    inverse root 0 (with ``B = 0``, ``U_A = 0`` and ``U_B`` is well defined).

    Args:
      a: ``A``, shape (..., m, r). For flax's ``lora_a (in, r)`` pass it as is.
      b: ``B``, shape (..., n, r). For flax's ``lora_b (r, out)`` pass ``lora_bᵀ``.
      mu_a: momentum (or gradient) of ``a``, same shape as ``a``.
      mu_b: momentum (or gradient) of ``b``, same shape as ``b``.
      method: ``"gram"`` (default) or ``"paper"``; see ``METHODS``.

    Returns:
      ``(U_A, U_B)`` in float32 with the shapes of ``a`` and ``b``.

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
