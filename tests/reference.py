"""Independent float64 NumPy oracle for LoRA-Muon, written from the spec.

Source: docs/algorithm.md (Cesista, Crowson, Simal, Biderman, "LoRA-Muon:
Spectral Steepest Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026,
Algorithm 1). Exact linear algebra only (SVD, eigh) — no JAX, no iterations, and
nothing taken from the code under test.

Math layout: ``W = W_pre + A Bᵀ`` with ``A: (m, r)``, ``B: (n, r)``;
``G_A = G_W B``, ``G_B = G_Wᵀ A``.
"""

from __future__ import annotations

import numpy as np

# Singular values / eigenvalues below this fraction of the largest are treated
# as exact zeros (rank-deficient inputs): the polar factor and the inverse root
# act as pseudo-inverses on the numerical null space.
RANK_TOL = 1e-12


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def msign(x: np.ndarray) -> np.ndarray:
    """Polar factor ``U Vᵀ`` of the thin SVD ``x = U Σ Vᵀ`` (last two axes).

    Singular values below ``RANK_TOL · max`` are dropped, so a rank-deficient
    ``x`` maps to a partial isometry and ``msign(0) = 0``.
    """
    x = _f64(x)
    if x.ndim > 2:
        return np.stack([msign(xi) for xi in x])
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return np.zeros_like(x)
    keep = s > RANK_TOL * s[0]
    return u[:, keep] @ vt[keep, :]


def inv_sqrt(s: np.ndarray) -> np.ndarray:
    """``S^{-1/2}`` of a symmetric PSD matrix by ``eigh`` (last two axes).

    Spec convention ("degenerate Grams"): a zero Gram has inverse root 0.
    Eigenvalues at or below ``RANK_TOL · max`` are treated as zero
    (pseudo-inverse root), negative rounding noise included.
    """
    s = _f64(s)
    if s.ndim > 2:
        return np.stack([inv_sqrt(si) for si in s])
    s = 0.5 * (s + s.T)
    w, v = np.linalg.eigh(s)
    if w.size == 0 or w[-1] <= 0.0:
        return np.zeros_like(s)
    keep = w > RANK_TOL * w[-1]
    inv_root = np.zeros_like(w)
    inv_root[keep] = 1.0 / np.sqrt(w[keep])
    return (v * inv_root) @ v.T


def direction(
    a: np.ndarray, b: np.ndarray, mu_a: np.ndarray, mu_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Unit LoRA-Muon directions ``(U_A, U_B)``; the step is ``ΔA = -(η/2) U_A``.

    ``U_A = msign(M_A R_B) R_B``, ``U_B = msign(M_B R_A) R_A`` with
    ``R_A = (AᵀA)^{-1/2}``, ``R_B = (BᵀB)^{-1/2}`` (spec, step 3).
    """
    a, b, mu_a, mu_b = (_f64(x) for x in (a, b, mu_a, mu_b))
    r_a = inv_sqrt(a.T @ a)
    r_b = inv_sqrt(b.T @ b)
    return msign(mu_a @ r_b) @ r_b, msign(mu_b @ r_a) @ r_a


def step(
    a: np.ndarray,
    b: np.ndarray,
    g_a: np.ndarray,
    g_b: np.ndarray,
    mu_a: np.ndarray,
    mu_b: np.ndarray,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.01,
    lora_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One LoRA-Muon step (spec, Algorithm 1). Returns ``(A', B', M_A', M_B')``.

    1. EMA momentum, no bias correction: ``M ← βM + (1-β)G``; with Nesterov the
       direction is computed from ``βM' + (1-β)G`` (the state stays ``M'``).
    2-3. ``ΔA = -(η/2)/lora_scale · U_A``, ``ΔB = -(η/2)/lora_scale · U_B`` with
       the Grams of the *current* factors.
    4. split weight decay ``s = sqrt(1 - λη)``: ``A ← sA + ΔA/s``, ``B ← sB + ΔB/s``.
    """
    a, b, g_a, g_b, mu_a, mu_b = (_f64(x) for x in (a, b, g_a, g_b, mu_a, mu_b))
    if not weight_decay * lr < 1.0:
        raise ValueError(f"split weight decay needs λη < 1, got {weight_decay * lr=}")
    beta = momentum
    new_mu_a = beta * mu_a + (1.0 - beta) * g_a
    new_mu_b = beta * mu_b + (1.0 - beta) * g_b
    if nesterov:
        in_a = beta * new_mu_a + (1.0 - beta) * g_a
        in_b = beta * new_mu_b + (1.0 - beta) * g_b
    else:
        in_a, in_b = new_mu_a, new_mu_b
    u_a, u_b = direction(a, b, in_a, in_b)
    delta_a = -(lr / 2.0) / lora_scale * u_a
    delta_b = -(lr / 2.0) / lora_scale * u_b
    s = np.sqrt(1.0 - weight_decay * lr)
    return s * a + delta_a / s, s * b + delta_b / s, new_mu_a, new_mu_b


def random_orthonormal(rng: np.random.Generator, m: int, r: int) -> np.ndarray:
    """An m×r matrix with orthonormal columns (Haar-distributed via signed QR)."""
    q, rr = np.linalg.qr(rng.standard_normal((m, r)))
    return q * np.sign(np.diagonal(rr))


def random_factor(
    rng: np.random.Generator, m: int, r: int, cond: float, scale: float = 1.0
) -> np.ndarray:
    """m×r matrix with singular values ``geomspace(1, 1/cond, r) · scale``."""
    u = random_orthonormal(rng, m, r)
    v = random_orthonormal(rng, r, r)
    sigma = np.geomspace(1.0, 1.0 / cond, r) * scale
    return (u * sigma) @ v.T


def column_projector(x: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto the column space of ``x`` (numerical rank)."""
    x = _f64(x)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return np.zeros((x.shape[0], x.shape[0]))
    q = u[:, s > RANK_TOL * s[0]]
    return q @ q.T


def projector_delta_w(g_w: np.ndarray, a: np.ndarray, b: np.ndarray, lr: float) -> np.ndarray:
    """Spec's projector form: ``ΔW = -(η/2) msign(G_W P_B) - (η/2) msign(P_A G_W)``."""
    g_w = _f64(g_w)
    p_a = column_projector(a)
    p_b = column_projector(b)
    return -(lr / 2.0) * msign(g_w @ p_b) - (lr / 2.0) * msign(p_a @ g_w)
