"""Matmul-only matrix functions: the polar factor and the SPD inverse square root.

Both are fixed-length polynomial iterations (no QR, no eigh, no SVD), so they
jit, vmap and shard like any other matmul chain and run in float32 at
``precision=HIGHEST`` whatever the input dtype.

References:
  Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest Descent on
  the Low-Rank Manifold", arXiv:2606.12921, 2026 (Appendix B.3 Table 1, B.4
  Table 2).
  Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods
  and Their Application to the Muon Algorithm", arXiv:2505.16932, 2025.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from lora_muon_jax._coefficients import (  # re-exported: tests and tools read them here
    GRAM_FAST_INV_SQRT_COEFFS,
    GRAM_INV_SQRT_COEFFS,
    GRAM_INV_SQRT_EPS,
    GRAM_INV_SQRT_FALLBACK_EPS,
    GRAM_INV_SQRT_TOL,
    PAPER_INV_SQRT_COEFFS,
    PAPER_INV_SQRT_EPS,
    PAPER_INV_SQRT_GAMMA,
    PAPER_MSIGN_COEFFS,
    POLISH_MAX_TRACE,
)

InverseSqrtMethod = Literal["gram", "paper"]
_INV_SQRT_METHODS: dict[str, str] = {
    "gram": "Y–Z coupled Polar-Express iteration, 9 steps, ε = 1e-8 (fallback 1e-5)",
    "paper": "the paper's Table 2: 7 coupled steps, ε = 1e-5, γ = 1.001",
}

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32
# A Gram whose largest diagonal entry is below float32's smallest normal number
# is treated as exactly zero (its factor underflows when squared): inverse root 0.
# (XLA on CPU flushes subnormal numbers to zero anyway.)
_TINY = float(jnp.finfo(jnp.float32).tiny)


def compute_dtype(*dtypes: object) -> jnp.dtype:
    """float64 if any input is float64 (x64 mode), else float32: the math's dtype."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):  # type: ignore[arg-type]
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def tiny(dtype: object) -> float:
    """Smallest normal number of ``dtype``: below it XLA flushes values to zero."""
    return float(jnp.finfo(dtype).tiny)  # type: ignore[arg-type]


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _sym(x: jax.Array) -> jax.Array:
    return 0.5 * (x + _mT(x))


def _eye_like(p: jax.Array) -> jax.Array:
    """Identities in p's shape, dtype and (explicit-mesh) sharding of its batch axes."""
    eye = jnp.eye(p.shape[-1], dtype=p.dtype).reshape((1,) * (p.ndim - 2) + p.shape[-2:])
    return jnp.zeros_like(p) + eye


def explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """x's sharding where it lives on a mesh with Explicit axes (``None`` elsewhere).

    Read from ``jax.typeof(x)``, so it works on traced values; no mesh axis name
    is assumed.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding


def padded_spec(sharding: jax.sharding.NamedSharding, ndim: int) -> tuple[Any, ...]:
    """The sharding's PartitionSpec as one entry per axis of an ``ndim``-axis array."""
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def _gram_out_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """Output sharding of a Gram (or any contraction of x's tall axis) on an explicit mesh.

    On a mesh with Explicit axes, contracting a sharded axis is ambiguous and
    JAX asks for ``out_sharding``: the batch axes keep x's sharding and the
    r×r axes are replicated (one r×r all-reduce; the tall axis is never
    gathered). Auto meshes and unsharded inputs need nothing (``None``).
    """
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    spec = padded_spec(sharding, x.ndim)
    return jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*spec[:-2], None, None)
    )


def gram(x: jax.Array, *, rank_first: bool = False) -> jax.Array:
    """The r×r Gram in the compute dtype: ``xᵀx`` of (..., m, r), or ``x xᵀ`` of (..., r, m).

    float32 for float32/bfloat16/float16 inputs, float64 for float64. A tall
    axis sharded over a mesh becomes partial sums and one r×r all-reduce; on
    explicit meshes the output is r×r-replicated.
    """
    spec = "...rm,...sm->...rs" if rank_first else "...mr,...ms->...rs"
    return jnp.einsum(
        spec,
        x,
        x,
        precision=_HIGHEST,
        preferred_element_type=compute_dtype(x.dtype),
        out_sharding=_gram_out_sharding(x),
    )


def _coeff_table(coeffs: tuple[tuple[float, float, float], ...], dtype: object) -> jax.Array:
    return jnp.asarray(coeffs, dtype=dtype)  # type: ignore[arg-type]


def _paper_iteration(p0: jax.Array) -> jax.Array:
    """Paper Table 2: ``W = (a/γ)I + (b/γ³)P + (c/γ⁵)P²; X ← XW; P ← sym(P W²)``."""
    eye = _eye_like(p0)
    g = PAPER_INV_SQRT_GAMMA
    table = _coeff_table(PAPER_INV_SQRT_COEFFS, p0.dtype) / jnp.asarray([[g, g**3, g**5]], p0.dtype)

    def body(carry: tuple[jax.Array, jax.Array], abc: jax.Array):
        x, pk = carry
        w = abc[0] * eye + abc[1] * pk + abc[2] * _mm(pk, pk)
        return (_mm(x, w), _sym(_mm(pk, _mm(w, w)))), None

    (x, _), _ = jax.lax.scan(body, (eye, p0), table)
    return _sym(x)


Schedule = tuple[tuple[float, float, float], ...]


def _yz_iteration(
    p0: jax.Array, polish: bool = False, coeffs: Schedule = GRAM_INV_SQRT_COEFFS
) -> tuple[jax.Array, jax.Array]:
    """``M = Z Y; W = aI + bM + cM²; Y ← Y W; Z ← W Z`` (Y → P₀^{1/2}, Z → P₀^{-1/2}).

    The two-sided coupled form (Higham 1997) stays stable under the large
    early-step coefficients, where ``P ← P W²`` drifts. Returns Z and the
    residual ``Σ|Z Y − I| / r`` per matrix.
    """
    eye = _eye_like(p0)

    def body(carry: tuple[jax.Array, jax.Array], abc: jax.Array):
        y, z = carry
        m = _mm(z, y)
        w = abc[0] * eye + abc[1] * m + abc[2] * _mm(m, m)
        return (_mm(y, w), _mm(w, z)), None

    table = _coeff_table(coeffs, p0.dtype)
    (y, z), _ = jax.lax.scan(body, (p0, eye), table)
    # A sum (not a max: XLA's max-reduce can drop NaN) so a NaN fails the check.
    residual = jnp.sum(jnp.abs(_mm(z, y) - eye), axis=(-2, -1)) / p0.shape[-1]
    z = _sym(z)
    if polish:
        # One Newton step on P₀ itself, Z ← Z (3I − Z P₀ Z) / 2, removes most of
        # the rounding the coupled products accumulate (1e-5 → 4e-7 at κ = 10,
        # r = 8). Only on well-conditioned matrices (‖Z‖_F² = Σ 1/λ̂ <= 100): on
        # ill-conditioned ones the product Z P₀ Z adds more rounding than it removes.
        polished = _sym(_mm(z, 1.5 * eye - 0.5 * _mm(z, _mm(p0, z))))
        well = jnp.sum(z * z, axis=(-2, -1)) <= POLISH_MAX_TRACE
        z = jnp.where(well[..., None, None], polished, z)
    return z, residual


def normalize_psd(p: jax.Array, *, sharp: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``P = t · P̂`` with ``λ_max(P̂) <= 1``, computed without overflow.

    ``t = ‖P‖_F`` (within √r of λ_max), or with ``sharp`` the tighter bound
    ``‖P⁴‖_F^{1/4}`` (within r^{1/8}; two more r×r products). Returns
    ``(P̂, t, is_zero)``; a numerically zero P (largest diagonal entry below
    the dtype's smallest normal number) gives ``P̂ = 0, t = 0``.
    """
    p = p.astype(compute_dtype(p.dtype))
    diag_max = jnp.max(jnp.diagonal(p, axis1=-2, axis2=-1), axis=-1)
    is_zero = ~(diag_max >= tiny(p.dtype))  # zero, subnormal (flushed) or NaN-free empty
    safe_diag = jnp.where(is_zero, 1.0, diag_max)
    p = p / safe_diag[..., None, None]  # |p_ij| <= 1: the norms cannot overflow
    if sharp:
        p2 = _mm(p, p)
        norm = jnp.sqrt(jnp.sqrt(jnp.sqrt(jnp.sum(_mm(p2, p2) ** 2, axis=(-2, -1)))))
    else:
        norm = jnp.sqrt(jnp.sum(p * p, axis=(-2, -1)))
    norm = jnp.where(is_zero, 1.0, norm)
    p_hat = jnp.where(is_zero[..., None, None], 0.0, p / norm[..., None, None])
    return p_hat, jnp.where(is_zero, 0.0, safe_diag * norm), is_zero


def damped_inverse_sqrt(
    p_hat: jax.Array, eps: float, *, polish: bool = False, coeffs: Schedule = GRAM_INV_SQRT_COEFFS
) -> jax.Array:
    """``Z ≈ (P̂ + εI)^{-1/2}`` for ``‖P̂‖_F <= 1`` (the gram schedule, with a safe retry).

    A matrix whose coupled iteration fails its residual check (float32
    rounding can make a numerically singular Gram slightly indefinite) is
    recomputed with damping ``max(ε, 1e-5)`` inside a ``lax.cond``; anything
    still non-finite becomes 0, so no NaN leaves a finite input.
    """
    eye = _eye_like(p_hat)
    z, residual = _yz_iteration(p_hat + eps * eye, polish, coeffs)
    failed = ~(residual <= GRAM_INV_SQRT_TOL) & (jnp.sum(jnp.abs(p_hat), axis=(-2, -1)) > 0)

    def _retry(z: jax.Array) -> jax.Array:
        z_safe, _ = _yz_iteration(
            p_hat + max(eps, GRAM_INV_SQRT_FALLBACK_EPS) * eye, polish, coeffs
        )
        z_safe = jnp.where(jnp.isfinite(z_safe), z_safe, 0.0)
        return jnp.where(failed[..., None, None], z_safe, z)

    return jax.lax.cond(jnp.any(failed), _retry, lambda z: z, z)


def inverse_sqrt_normalized(
    p: jax.Array,
    method: InverseSqrtMethod = "gram",
    *,
    eps: float | None = None,
    fast_gate: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Matmul-only inverse square root, split as ``P^{-1/2} ≈ scale · X``.

    ``t = ‖P‖_F``, ``P₀ = P/t + εI``, ``X ≈ P₀^{-1/2}``, ``scale = t^{-1/2}``.
    Returning X (entries at most ~ε^{-1/2}) and the scalar apart keeps products
    of several roots finite whatever the scale of P. A numerically zero P gives
    ``X = 0, scale = 0`` (the paper's convention).

    Args:
      p: symmetric positive semi-definite, shape (..., r, r), any float dtype.
      method: ``"gram"`` or ``"paper"`` (see ``_INV_SQRT_METHODS``).
      eps: (gram only) damping relative to ``‖P‖_F``; default ``GRAM_INV_SQRT_EPS``.
      fast_gate: (gram only) the 6-step ``GRAM_FAST_INV_SQRT_COEFFS``, exact only for
        singular values of P̂ above 5e-3: for roots that a gate on their largest
        eigenvalue (<= 100) checks afterwards, as the Gram form's fast path does.

    Returns:
      ``(X, scale)`` with shapes (..., r, r) and (...), in the compute dtype.
    """
    p_hat, t, is_zero = normalize_psd(p)
    if method == "paper":
        x = _paper_iteration(p_hat + PAPER_INV_SQRT_EPS * _eye_like(p_hat))
    elif method == "gram":
        eps = GRAM_INV_SQRT_EPS if eps is None else eps
        coeffs = GRAM_FAST_INV_SQRT_COEFFS if fast_gate else GRAM_INV_SQRT_COEFFS
        x = damped_inverse_sqrt(p_hat, eps, polish=eps >= GRAM_INV_SQRT_EPS, coeffs=coeffs)
    else:
        raise ValueError(f"method must be one of {sorted(_INV_SQRT_METHODS)}, got {method!r}")
    x = jnp.where(is_zero[..., None, None], 0.0, x)
    safe_t = jnp.where(is_zero, 1.0, t)
    return x, jnp.where(is_zero, 0.0, jax.lax.rsqrt(safe_t))


def polar_finish(h: jax.Array, tau: float, sharpen: int = 3) -> jax.Array:
    r"""``F`` with ``X F`` the polar factor of X on its resolved directions, 0 on its noise.

    ``H = XᵀX = t Ĥ`` (``normalize_psd(sharp=True)``), ``Z = (Ĥ + τI)^{-1/2}``:
    ``Y = X Z t^{-1/2}`` has singular values ``σ = (ĥ/(ĥ+τ))^{1/2}`` — 1 − τ/2ĥ
    where X is resolved, ~ (ĥ/τ)^{1/2} on rounding noise below τ. Then
    ``sharpen`` times ``Y ← Y q(YᵀY)``, ``q(g) = (5 − 3g)/2 ·g``, i.e.
    ``σ ↦ (5σ³ − 3σ⁵)/2``: 1 stays 1 with zero slope (so the τ shrink and
    rounding near 1 vanish to second order), small σ are cubed away, and no
    σ <= 1.29 maps above 1. All of it is r×r: ``YᵀY = I − τZ²`` exactly, so
    ``F = Φ(I − τZ²) Z t^{-1/2}`` with Φ the composed polynomial — Φ on the
    left keeps F's rows along noise directions at rounding level, not τ^{-1/2}.
    Not a bound by itself: ``isometry_certificate`` on the Gram of ``X F`` is.
    """
    h_hat, t, is_zero = normalize_psd(h, sharp=True)
    z = damped_inverse_sqrt(h_hat, tau)
    eye = _eye_like(z)
    g = _sym(eye - tau * _mm(z, z))  # YᵀY, eigenvalues ĥ/(ĥ+τ) in [0, 1]
    phi = eye
    for _ in range(sharpen):
        q = _mm(g, 2.5 * eye - 1.5 * g)  # (5g − 3g²)/2
        phi = _mm(q, phi)
        g = _sym(_mm(q, _mm(g, q)))
    # g's eigenvalues leave [0, 1] only if rounding made Ĥ + τI nearly singular
    # (an eigenvalue of Ĥ near −τ); q would then grow without bound. Such a
    # matrix keeps Φ = I: Y is then merely not sharpened.
    tame = jnp.all(jnp.isfinite(phi), axis=(-2, -1)) & (jnp.max(jnp.abs(phi), axis=(-2, -1)) <= 4.0)
    phi = jnp.where(tame[..., None, None], phi, eye)
    f = jnp.where(is_zero[..., None, None], 0.0, _mm(phi, z))
    return f * jnp.where(is_zero, 0.0, jax.lax.rsqrt(jnp.where(is_zero, 1.0, t)))[..., None, None]


def isometry_certificate(g: jax.Array, steps: int = 2) -> jax.Array:
    r"""``C`` with ``‖Y C‖₂ <= 1`` from the *computed* Gram ``G = YᵀY`` of a near-isometry Y.

    ``steps`` Newton–Schulz steps ``Y ← Y (3I − YᵀY)/2``, i.e. σ ↦ σ(3 − σ²)/2:
    every σ in [0, √3] maps into [0, 1], 1 is fixed with zero slope (σ = 1 ± ε
    goes to 1 − 1.5ε², so what an earlier stage left is squashed, never
    amplified). Because G is the Gram of the Y that was actually formed, the
    bound holds up to the rounding of ``Y C`` itself.
    """
    eye = _eye_like(g)
    c = eye
    for _ in range(steps):
        q = 1.5 * eye - 0.5 * g
        c = _mm(c, q)
        g = _sym(_mm(q, _mm(g, q)))
    return c


def inverse_sqrt(p: jax.Array, *, method: InverseSqrtMethod = "gram") -> jax.Array:
    """Inverse square root of a symmetric PSD matrix by a matmul-only iteration.

    ``method="gram"`` uses this package's Polar-Express schedule in the stable
    two-sided coupled form (9 steps, damping 1e-8·‖P‖_F; as accurate as
    float32 ``eigh`` for κ(P) up to ~1e6);
    ``method="paper"`` the paper's Table 2 (7 steps, ε = 1e-5, γ = 1.001).
    A numerically zero P (largest diagonal entry below the dtype's smallest
    normal number) has inverse root 0, the paper's convention.

    Args:
      p: shape (..., r, r); leading axes are batch axes.
      method: ``"gram"`` or ``"paper"``.

    Returns:
      ``P^{-1/2}`` of shape (..., r, r), float32 (float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import inverse_sqrt
      >>> r = inverse_sqrt(jnp.diag(jnp.array([4.0, 1.0])))
      >>> [round(float(v), 4) for v in jnp.diagonal(r)]
      [0.5, 1.0]
    """
    if method not in _INV_SQRT_METHODS:
        raise ValueError(f"method must be one of {sorted(_INV_SQRT_METHODS)}, got {method!r}")
    if p.ndim < 2 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"inverse_sqrt needs square matrices (..., r, r), got {p.shape=}")
    x, scale = inverse_sqrt_normalized(p, method)
    return x * scale[..., None, None]


def matrix_sign(
    x: jax.Array,
    *,
    coeffs: tuple[tuple[float, float, float], ...] = PAPER_MSIGN_COEFFS,
) -> jax.Array:
    """Polar factor ``msign(X) = U Vᵀ`` (thin SVD ``X = U Σ Vᵀ``) by Newton–Schulz.

    The paper's Appendix B.3 recipe: orient X so that ``X Xᵀ`` is the small
    side, normalise by the Frobenius norm, then per row (a, b, c)
    ``U = X Xᵀ; X ← a X + (b U + c U²) X``; orient back. For a tall m×r input
    every step costs O(m r²). Zero singular values stay zero.

    Args:
      x: shape (..., m, n); leading axes are batch axes. Any float dtype.
      coeffs: one (a, b, c) row per step; default: the paper's Table 1 (8 steps).

    Returns:
      The polar factor, shape (..., m, n), float32 (float64 for float64 input).
    """
    if x.ndim < 2:
        raise ValueError(f"matrix_sign needs matrices (..., m, n), got {x.shape=}")
    x = x.astype(compute_dtype(x.dtype))
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = _mT(x)
    amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    x = x / jnp.where(amax >= tiny(x.dtype), amax, 1.0)  # the norm below cannot overflow
    norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / jnp.where(norm > 0, norm, 1.0)

    def body(x: jax.Array, abc: jax.Array):
        u = gram(x, rank_first=True)  # x xᵀ, r×r (one all-reduce if m is sharded)
        return abc[0] * x + _mm(abc[1] * u + abc[2] * _mm(u, u), x), None

    x, _ = jax.lax.scan(body, x, _coeff_table(coeffs, x.dtype))
    return _mT(x) if transpose else x
