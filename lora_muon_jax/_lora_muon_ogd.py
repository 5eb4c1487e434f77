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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import _base, _checks, _direction, _lora_muon, _pairs, _polar, _scales
from lora_muon_jax._direction import FactorPair, Method
from lora_muon_jax._pairs import DimensionNumbersArg, LoRAPair, PairRule

_HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32

# ---------------------------------------------------------------- constants
# Default dual steps per optimizer step and dimensionless dual step size σ.
# Measured (docs/lora_muon_ogd.md): within one step, from Λ = 0, the residual
# ‖UᵀΔWV‖ contracts geometrically for σ ≲ 1 (σ = 0.5: ×0.55–0.8 per dual step)
# when the shifted momenta are well conditioned; in training, where Λ is
# warm-started over hundreds of steps and the momenta are rank-deficient
# (the dual is nonsmooth there), σ = 0.003–0.01 protected past tasks best and
# σ ≥ 0.05 did worse than no constraint (experiments/continual.py).
DEFAULT_DUAL_STEPS = 2
DEFAULT_DUAL_STEP_SIZE = 0.01
# Up to this many dual steps are unrolled; more run in a lax.scan (one copy of the
# direction in the program, so compile time does not grow with J). Measured on CPU
# (1024×1024, r = k = 16, a loaded 2-core machine): unrolled J = 2 costs about 2
# LoRA-Muon directions, the scan about 4 (XLA does not fuse across the loop).
UNROLL_MAX_DUAL_STEPS = 4
# Bases passed to update_ogd_bases must have orthonormal (or zero) columns to
# this absolute tolerance on every entry of UᵀU − diag(0/1) (float32 rounding
# of a computed basis is ~1e-6).
ORTHONORMAL_TOL = 1e-4
# update_ogd_bases, mode="append": a direction of the union whose Gram
# eigenvalue is below this is already spanned (angle < ~0.045 rad to the span).
OVERLAP_TOL = 1e-3
# ogd_bases_from_delta: singular values below this fraction of the largest are
# noise (float32 rounding of the 2r×2r core): their columns are left zero.
DELTA_RTOL = 1e-4

BasisMode = Literal["append", "replace"]
# One registry: validates `mode` and documents each value.
BASIS_MODES: dict[str, str] = {
    "append": (
        "concatenate the new bases to the state's, re-orthonormalise the union (directions "
        "already spanned within OVERLAP_TOL are dropped), raise if it exceeds num_bases; "
        "the constraint then covers P_U ΔW P_V for the union (cross blocks included)"
    ),
    "replace": "use the new bases alone (zero-padded to num_bases)",
}


class OGDBasis(NamedTuple):
    """One pair's constraint bases (N = product of the pair's batch axes).

    ``u`` spans A's side (``lora_a``'s input axes flattened, m), ``v`` B's side
    (``lora_b``'s output axes flattened, n); columns are orthonormal or zero.
    """

    u: jax.Array  # (N, m, k) float32
    v: jax.Array  # (N, n, k) float32
    s: jax.Array | None = None  # (N, k) singular values of ΔW (ogd_bases_from_delta), or None


class ScaleByLoRAMuonOGDState(NamedTuple):
    """State of ``scale_by_lora_muon_ogd``: LoRA-Muon's momenta plus per-pair bases and dual.

    Dicts are keyed by the pair's name (``str(LoRAPair.name)``); N is the
    product of the pair's batch axes and k the capacity ``num_bases``.
    """

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of factor gradients: the params' tree and shapes, dtype mu_dtype
    u: dict[str, jax.Array]  # (N, m, k) float32, orthonormal or zero columns
    v: dict[str, jax.Array]  # (N, n, k) float32, orthonormal or zero columns
    dual: dict[str, jax.Array]  # (N, k, k) float32, Λ̃ = α Λ (units of the factor momenta)
    residual: dict[str, jax.Array]  # (N,) float32, ‖Uᵀ ΔW V‖_F / η of the last step


# ---------------------------------------------------------------- private helpers


def _check_int(where: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {name}={value!r}")
    return int(value)


def _project(basis: jax.Array, x: jax.Array, rank_first: bool) -> jax.Array:
    """``basisᵀ X`` (N, k, r) for ``X`` as an (N, m, r) view or its (N, r, m) rank-first form."""
    spec = "Nmk,Nrm->Nkr" if rank_first else "Nmk,Nmr->Nkr"
    return jnp.einsum(spec, basis, x, precision=_HIGHEST)


def _expand(basis: jax.Array, c: jax.Array, rank_first: bool) -> jax.Array:
    """``basis C`` for ``C (N, k, r)``, in the view's orientation."""
    spec = "Nmk,Nkr->Nrm" if rank_first else "Nmk,Nkr->Nmr"
    return jnp.einsum(spec, basis, c, precision=_HIGHEST)


def _inner(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(x * y, axis=(-2, -1))


class _Constraint(NamedTuple):
    u: jax.Array  # (N, m, k)
    v: jax.Array  # (N, n, k)
    dual: jax.Array  # (N, k, k)


def _ogd_directions(
    views: Sequence[FactorPair],
    constraints: Sequence[_Constraint],
    unit_directions: Callable[[list[FactorPair]], list[tuple[jax.Array, ...]]],
    dual_steps: int,
    dual_step_size: float | jax.Array,
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array], list[jax.Array]]:
    """Unit OGD directions of many pairs: J primal (LoRA-Muon) solves with dual ascent between.

    ``unit_directions`` maps shifted views to LoRA-Muon unit directions
    ``msign(M R) R`` (batched across pairs). Returns the directions of the
    last primal solve, the updated duals Λ̃ and the unit residuals
    ``‖Uᵀ ΔW V‖_F / η`` of the returned step.
    """
    prepared = []
    for p, c in zip(views, constraints, strict=True):
        dt = _polar.compute_dtype(p.a.dtype, p.b.dtype, p.mu_a.dtype, p.mu_b.dtype)
        u, v, dual = c.u.astype(dt), c.v.astype(dt), c.dual.astype(dt)
        a, b = p.a.astype(dt), p.b.astype(dt)
        ua = _project(u, a, p.a_rank_first)  # UᵀA (N, k, r)
        vb = _project(v, b, p.b_rank_first)  # VᵀB (N, k, r)
        prepared.append((dt, u, v, dual, a, b, ua, vb))

    sigma = jnp.asarray(dual_step_size, F32)

    def one_step(duals: list[jax.Array]) -> tuple[list[Any], list[jax.Array], list[jax.Array]]:
        shifted = []
        for p, (dt, u, v, _, a, b, ua, vb), dual in zip(views, prepared, duals, strict=True):
            # G_W + U Λ Vᵀ:  M_A + U Λ̃ (VᵀB),  M_B + V Λ̃ᵀ (UᵀA).
            mu_a = p.mu_a.astype(dt) + _expand(u, _polar._mm(dual, vb), p.a_rank_first)
            mu_b = p.mu_b.astype(dt) + _expand(v, _polar._mm(_polar._mT(dual), ua), p.b_rank_first)
            shifted.append(FactorPair(a, b, mu_a, mu_b, p.a_rank_first, p.b_rank_first))
        units = unit_directions(shifted)
        directions, residuals, new_duals = [], [], []
        for p, (dt, u, v, _, _a, _b, ua, vb), dual, (d_a, d_b) in zip(
            views, prepared, duals, units, strict=True
        ):
            d_a, d_b = d_a.astype(dt), d_b.astype(dt)
            directions.append((d_a, d_b))
            # Uᵀ ΔW V / η = −½ [(Uᵀ D_A)(VᵀB)ᵀ + (UᵀA)(Vᵀ D_B)ᵀ]   (the α's cancel).
            ud = _project(u, d_a, p.a_rank_first)
            vd = _project(v, d_b, p.b_rank_first)
            rho = -0.5 * (_polar._mm(ud, _polar._mT(vb)) + _polar._mm(ua, _polar._mT(vd)))
            r = p.a.shape[-2] if p.a_rank_first else p.a.shape[-1]
            # ν = (⟨M_A, D_A⟩ + ⟨M_B, D_B⟩) / 2r with the *unshifted* momenta: the
            # first-order gain of the step per unit of η/2 (at Λ = 0 the mean singular
            # value of the whitened momenta), so a growing Λ cannot feed back into ν.
            gain = _inner(p.mu_a.astype(dt), d_a) + _inner(p.mu_b.astype(dt), d_b)
            nu = jnp.maximum(gain, 0.0) / (2.0 * r)
            new = dual + sigma.astype(dt) * nu[..., None, None] * rho
            new_duals.append(jnp.where(jnp.isfinite(new), new, dual))
            residuals.append(jnp.sqrt(jnp.sum(rho * rho, axis=(-2, -1))))
        return directions, new_duals, residuals

    duals = [item[3] for item in prepared]
    if dual_steps <= UNROLL_MAX_DUAL_STEPS:
        for _ in range(dual_steps):
            directions, duals, residuals = one_step(duals)
        return directions, duals, residuals

    # A scan keeps one copy of the direction in the program whatever J is.
    def body(carry: Any, _: None) -> tuple[Any, None]:
        return one_step(carry[1]), None

    shapes = jax.eval_shape(one_step, duals)
    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    init = (init[0], duals, init[2])
    (directions, duals, residuals), _ = jax.lax.scan(body, init, None, length=dual_steps)
    return directions, duals, residuals


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


# ---------------------------------------------------------------- pure math


def lora_muon_ogd_direction(
    a: jax.Array,
    b: jax.Array,
    mu_a: jax.Array,
    mu_b: jax.Array,
    u: jax.Array,
    v: jax.Array,
    dual: jax.Array | None = None,
    *,
    dual_steps: int = DEFAULT_DUAL_STEPS,
    dual_step_size: float | jax.Array = DEFAULT_DUAL_STEP_SIZE,
    method: Method = "gram",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Unit LoRA-Muon-OGD direction of one factor pair (math layout, batched).

    With ``Λ̃⁽⁰⁾ = dual`` (zeros if ``None``), for ``j = 1 … dual_steps``:
    ``U_A = msign((M_A + U Λ̃ VᵀB) R_B) R_B``,
    ``U_B = msign((M_B + V Λ̃ᵀ UᵀA) R_A) R_A``, then
    ``Λ̃ ← Λ̃ + σ ν ρ`` with ``ρ = −½ Uᵀ(U_A Bᵀ + A U_Bᵀ)V`` (the residual of
    the step ``ΔA = −(η/2) U_A``, ``ΔB = −(η/2) U_B`` in units of η) and ν the
    mean singular value of the whitened shifted momenta. Each half keeps
    ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1`` (LoRA-Muon's trust region).

    Args:
      a: ``A``, shape (..., m, r).
      b: ``B``, shape (..., n, r) (flax's ``lora_b`` transposed).
      mu_a: momentum (or gradient ``G_W B``) of ``a``, same shape.
      mu_b: momentum (or gradient ``G_Wᵀ A``) of ``b``, same shape.
      u: (..., m, k) with orthonormal (or zero) columns.
      v: (..., n, k) with orthonormal (or zero) columns.
      dual: warm start Λ̃ (..., k, k), or ``None``.
      dual_steps: J ≥ 1, primal solves (each followed by a dual step).
      dual_step_size: σ ≥ 0, dimensionless.
      method: ``"gram"`` or ``"paper"`` (LoRA-Muon's ``METHODS``).

    Returns:
      ``(U_A, U_B, dual, residual)``: the unit directions of the last primal
      solve (shapes of ``a``, ``b``), the updated Λ̃ (..., k, k) and the unit
      residual ``‖Uᵀ ΔW V‖_F / η`` of that step (...). With ``k = 0`` the
      directions are ``lora_muon_direction``'s, bit for bit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon_ogd_direction
      >>> ka, kb, kg, ku = jax.random.split(jax.random.key(0), 4)
      >>> a = jax.random.normal(ka, (64, 4)); b = jax.random.normal(kb, (32, 4))
      >>> g_w = jax.random.normal(kg, (64, 32))
      >>> u = jnp.linalg.qr(jax.random.normal(ku, (64, 2)))[0]; v = jnp.eye(32, 2)
      >>> u_a, u_b, dual, res = lora_muon_ogd_direction(
      ...     a, b, g_w @ b, g_w.T @ a, u, v, dual_steps=8, dual_step_size=0.5)
      >>> bool(res < 0.1), round(float(jnp.linalg.norm(u_a @ b.T, ord=2)), 3)
      (True, 1.0)
    """
    _direction.check_method(method)
    where = "lora_muon_ogd_direction"
    dual_steps = _check_int(where, "dual_steps", dual_steps, 1)
    _checks.check_static(where, "dual_step_size", dual_step_size, "nonnegative")
    if a.ndim < 2 or b.ndim < 2 or u.ndim != a.ndim or v.ndim != b.ndim:
        raise ValueError(
            f"{where}: need a (..., m, r), b (..., n, r), u (..., m, k), v (..., n, k), got "
            f"{a.shape=} {b.shape=} {u.shape=} {v.shape=}"
        )
    if mu_a.shape != a.shape or mu_b.shape != b.shape:
        raise ValueError(
            f"{where}: momenta must match their factors: "
            f"{a.shape=} {mu_a.shape=} {b.shape=} {mu_b.shape=}"
        )
    batch, k = a.shape[:-2], u.shape[-1]
    if (
        a.shape[-1] != b.shape[-1]
        or b.shape[:-2] != batch
        or u.shape[:-1] != a.shape[:-1]
        or v.shape[:-1] != b.shape[:-1]
        or v.shape[-1] != k
    ):
        raise ValueError(
            f"{where}: shapes disagree: {a.shape=} {b.shape=} {u.shape=} {v.shape=} "
            "(a (..., m, r), b (..., n, r), u (..., m, k), v (..., n, k))"
        )
    if dual is not None and dual.shape != (*batch, k, k):
        raise ValueError(f"{where}: dual must have shape {(*batch, k, k)}, got {dual.shape=}")
    flat = [x.reshape((-1, *x.shape[-2:])) for x in (a, b, mu_a, mu_b)]
    n_batch = flat[0].shape[0]
    view = FactorPair(flat[0], flat[1], flat[2], flat[3])
    if k == 0:  # no constraint: LoRA-Muon itself
        ((u_a, u_b),) = _direction.lora_muon_directions([view], method)
        zeros = jnp.zeros((*batch, 0, 0), u_a.dtype)
        return (
            u_a.reshape(a.shape),
            u_b.reshape(b.shape),
            zeros,
            jnp.zeros(batch, u_a.dtype),
        )
    dual0 = jnp.zeros((n_batch, k, k), F32) if dual is None else dual.reshape((-1, k, k))
    constraint = _Constraint(u.reshape((-1, *u.shape[-2:])), v.reshape((-1, *v.shape[-2:])), dual0)
    (dirs,), (new_dual,), (res,) = _ogd_directions(
        [view],
        [constraint],
        lambda views: _direction.lora_muon_directions(views, method),
        dual_steps,
        dual_step_size,
    )
    return (
        dirs[0].reshape(a.shape),
        dirs[1].reshape(b.shape),
        new_dual.reshape((*batch, k, k)),
        res.reshape(batch),
    )


# ---------------------------------------------------------------- bases


def _orthonormal_columns(c: jax.Array, tol: float) -> tuple[jax.Array, np.ndarray]:
    """An orthonormal basis of each (N, m, c) stack's column span, strongest first.

    Two passes of Gram + eigh (c×c on the host, float64): the first keeps the
    directions whose Gram eigenvalue exceeds ``tol`` (relative to the largest)
    and whitens them, the second removes the rounding the first left. Columns
    beyond each matrix's rank are zero. Returns ``(basis (N, m, c), ranks (N,))``.
    """
    dt = _polar.compute_dtype(c.dtype)
    c = c.astype(dt)
    g = np.asarray(_polar.gram(c), np.float64)
    w, e = np.linalg.eigh(0.5 * (g + np.swapaxes(g, -1, -2)))
    w, e = w[..., ::-1], e[..., ::-1]  # strongest first
    top = np.maximum(w[..., :1], np.finfo(np.float64).tiny)
    keep = w > tol * top
    scale = np.where(keep, 1.0 / np.sqrt(np.where(keep, w, 1.0)), 0.0)
    q = _polar._mm(c, jnp.asarray(e * scale[..., None, :], dt))
    g2 = np.asarray(_polar.gram(q), np.float64)
    w2, e2 = np.linalg.eigh(0.5 * (g2 + np.swapaxes(g2, -1, -2)))
    w2, e2 = w2[..., ::-1], e2[..., ::-1]
    keep2 = w2 > 0.5  # the kept directions have eigenvalue ≈ 1, the dropped ≈ 0
    scale2 = np.where(keep2, 1.0 / np.sqrt(np.where(keep2, w2, 1.0)), 0.0)
    q = _polar._mm(q, jnp.asarray(e2 * scale2[..., None, :], dt))
    return q, keep2.sum(axis=-1)


def ogd_bases_from_delta(
    params_now: optax.Params,
    params_start: optax.Params,
    num_bases: int,
    *,
    rtol: float = DELTA_RTOL,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
) -> dict[str, OGDBasis]:
    r"""Top-k singular directions of each pair's task delta ``ΔW = A Bᵀ − A₀ B₀ᵀ``.

    Never forms the m×n ΔW: with ``ΔA = A − A₀``, ``ΔB = B − B₀``,

        ΔW = ΔA Bᵀ + A₀ ΔBᵀ = P Qᵀ,   P = [ΔA, A₀] (m×2r),   Q = [B, ΔB] (n×2r)

    (the differences are taken entrywise, so no product cancels). Orthonormal
    bases ``Q_P``, ``Q_Q`` of the tall P, Q come from their 2r×2r Grams (two
    Gram + eigh passes), the 2r×2r core ``C = (Q_PᵀP)(Q_QᵀQ)ᵀ`` gives
    ``C = Y Σ Zᵀ`` and ``ΔW = (Q_P Y) Σ (Q_Q Z)ᵀ``: ``U = Q_P Y_{:k}``,
    ``V = Q_Q Z_{:k}``. Cost: four tall products per pair plus 2r×2r work.
    Runs eagerly (between tasks, not in the training step); the singular
    values are of ``A Bᵀ`` (multiply by α for ``α A Bᵀ``).

    Args:
      params_now: the parameters after the task (any tree with LoRA pairs).
      params_start: the same tree before the task (e.g. ``lora_b = 0`` at init).
      num_bases: k ≥ 1, directions per pair (at most 2r are nonzero).
      rtol: singular values at or below ``rtol · σ_max`` (and columns beyond
        the delta's rank) give zero columns.
      pair_rule: how factors are paired (default ``default_pair_rule``).
      dimension_numbers: pair axis layout (default: inferred).

    Returns:
      ``{pair name: OGDBasis(u (N, m, k), v (N, n, k), s (N, k))}``, float32
      (float64 for float64 factors); feed it to ``update_ogd_bases``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import ogd_bases_from_delta
      >>> start = {'lora_a': jnp.eye(6, 2), 'lora_b': jnp.zeros((2, 5))}
      >>> now = {'lora_a': jnp.eye(6, 2), 'lora_b': 3.0 * jnp.eye(2, 5)}
      >>> (basis,) = ogd_bases_from_delta(now, start, 1).values()
      >>> basis.u.shape, round(float(basis.s[0, 0]), 3)
      ((1, 6, 1), 3.0)
    """
    where = "ogd_bases_from_delta"
    num_bases = _check_int(where, "num_bases", num_bases, 1)
    _checks.check_grads_match_params(where, params_start, params_now)
    pairs = _base.resolve_all_pairs(params_now, pair_rule, dimension_numbers, where)
    leaves_now = jax.tree_util.tree_leaves(params_now)
    leaves_start = jax.tree_util.tree_leaves(params_start)
    out: dict[str, OGDBasis] = {}
    for p in pairs:
        dt = _polar.compute_dtype(leaves_now[p.a_index].dtype, leaves_now[p.b_index].dtype)
        a, b = _pairs.math_views(leaves_now, p, dt)
        a0, b0 = _pairs.math_views(leaves_start, p, dt)
        big_p = jnp.concatenate([a - a0, a0], axis=-1)  # (N, m, 2r)
        big_q = jnp.concatenate([b, b - b0], axis=-1)  # (N, n, 2r)
        tol = 1e3 * float(jnp.finfo(dt).eps) ** 2  # eigenvalues of P's Gram: σ² scale
        q_p, _ = _orthonormal_columns(big_p, tol)
        q_q, _ = _orthonormal_columns(big_q, tol)
        core = _polar._mm(_project(q_p, big_p, False), _polar._mT(_project(q_q, big_q, False)))
        y, s, zt = np.linalg.svd(np.asarray(core, np.float64))
        k = min(num_bases, s.shape[-1])
        keep = s[..., :k] > rtol * np.maximum(s[..., :1], np.finfo(np.float64).tiny)
        keep &= s[..., :k] > 0
        y_k = jnp.asarray(y[..., :, :k] * keep[..., None, :], dt)
        z_k = jnp.asarray(np.swapaxes(zt, -1, -2)[..., :, :k] * keep[..., None, :], dt)
        pad = num_bases - k
        u = _polar._mm(q_p, y_k)
        v = _polar._mm(q_q, z_k)
        sv = jnp.asarray(s[..., :k] * keep, dt)
        if pad:
            u = jnp.pad(u, ((0, 0), (0, 0), (0, pad)))
            v = jnp.pad(v, ((0, 0), (0, 0), (0, pad)))
            sv = jnp.pad(sv, ((0, 0), (0, pad)))
        out[str(p.name)] = OGDBasis(u, v, sv)
    return out


def _is_ogd_state(x: Any) -> bool:
    return isinstance(x, ScaleByLoRAMuonOGDState)


def _basis_array(
    where: str, side: str, x: Any, n_batch: int, length: int, capacity: int
) -> jax.Array:
    """A user's basis as (N, length, k): checks shape, finiteness and orthonormal columns."""
    x = jnp.asarray(x)
    given = x.shape
    if x.ndim == 2 and n_batch == 1:
        x = x[None]
    if (
        x.ndim < 3
        or math.prod(x.shape[:-2]) != n_batch
        or x.shape[-2] != length
        or x.shape[-1] > capacity
    ):
        raise ValueError(
            f"{where}: {side} has shape {given}; expected (N={n_batch}, {length}, k) with "
            f"k <= num_bases={capacity} (or ({length}, k) for an unbatched pair)"
        )
    x = x.reshape((n_batch, length, x.shape[-1])).astype(_polar.compute_dtype(x.dtype))
    g = np.asarray(_polar.gram(x), np.float64)
    diag = np.diagonal(g, axis1=-2, axis2=-1)
    target = np.where(diag > 0.5, 1.0, 0.0)
    err = np.abs(g - target[..., None, :] * np.eye(g.shape[-1]))
    worst = float(err.max()) if err.size else 0.0
    if not np.all(np.isfinite(g)) or worst > ORTHONORMAL_TOL:
        raise ValueError(
            f"{where}: {side} (shape {x.shape}) must have orthonormal (or zero) columns: "
            f"max |{side}ᵀ{side} − diag(0/1)| = {worst:.3g} > {ORTHONORMAL_TOL}"
        )
    return x


def update_ogd_bases(
    opt_state: Any,
    bases: Mapping[str, OGDBasis | tuple[Any, Any]],
    *,
    mode: BasisMode = "append",
    overlap_tol: float = OVERLAP_TOL,
) -> Any:
    """A copy of ``opt_state`` whose LoRA-Muon-OGD states hold new constraint bases.

    Finds every ``ScaleByLoRAMuonOGDState`` in ``opt_state`` (any nesting:
    ``lora_muon_ogd``'s partition, ``optax.chain``, ``inject_hyperparams``)
    and, for each pair named in ``bases``, appends or replaces its bases
    (``BASIS_MODES``). The pair's dual Λ̃ is reset to zero (its meaning
    changed); momenta, count and the other pairs are untouched. Run it
    eagerly, between tasks (host-side k×k eigh).

    Args:
      opt_state: an optimizer state containing at least one
        ``ScaleByLoRAMuonOGDState``.
      bases: ``{pair name: OGDBasis or (u, v)}``: u (N, m, k_new), v (N, n, k_new)
        with orthonormal (or zero) columns (``ogd_bases_from_delta`` gives
        these), ``(m, k)``/``(n, k)`` for an unbatched pair.
      mode: ``"append"`` or ``"replace"``.
      overlap_tol: (append) Gram eigenvalue below which a direction of the
        union counts as already spanned.

    Returns:
      The new state (same tree structure, shapes and dtypes).

    Raises:
      ValueError: an unknown mode, no OGD state, a name that is no pair of
        it, a basis of the wrong shape or not orthonormal, or a union that
        needs more than ``num_bases`` columns (each message names the pair
        and the shapes).
    """
    where = "update_ogd_bases"
    if mode not in BASIS_MODES:
        raise ValueError(
            f"{where}: mode must be one of {sorted(BASIS_MODES)}, got {mode!r}. "
            + "; ".join(f"{k!r}: {v}" for k, v in BASIS_MODES.items())
        )
    found = []

    def update(st: Any) -> Any:
        if not _is_ogd_state(st):
            return st
        found.append(st)
        unknown = sorted(set(bases) - set(st.u))
        if unknown:
            raise ValueError(
                f"{where}: {unknown} are not LoRA pairs of this optimizer state "
                f"(its pairs: {sorted(st.u)})"
            )
        u_new, v_new, dual_new = dict(st.u), dict(st.v), dict(st.dual)
        for name, basis in bases.items():
            n_batch, m, cap = st.u[name].shape
            n = st.v[name].shape[1]
            at = f"{where}: pair {name}"
            bu = _basis_array(at, "u", basis[0], n_batch, m, cap)
            bv = _basis_array(at, "v", basis[1], n_batch, n, cap)
            if bu.shape[-1] != bv.shape[-1]:
                raise ValueError(f"{at}: u and v need the same k, got {bu.shape=} {bv.shape=}")
            if mode == "append":
                new_cols = []
                for old, b_new in ((st.u[name], bu), (st.v[name], bv)):
                    union = jnp.concatenate([old.astype(b_new.dtype), b_new], axis=-1)
                    q, ranks = _orthonormal_columns(union, overlap_tol)
                    if int(ranks.max()) > cap:
                        raise ValueError(
                            f"{at}: the union of the bases needs {int(ranks.max())} columns "
                            f"(old {old.shape}, new {b_new.shape}) but num_bases={cap}: build "
                            "the optimizer with a larger num_bases or pass fewer directions"
                        )
                    new_cols.append(q[..., :cap])
                bu, bv = new_cols
            else:
                pad = ((0, 0), (0, 0), (0, cap - bu.shape[-1]))
                bu, bv = jnp.pad(bu, pad), jnp.pad(bv, pad)
            u_new[name] = bu.astype(st.u[name].dtype)
            v_new[name] = bv.astype(st.v[name].dtype)
            dual_new[name] = jnp.zeros_like(st.dual[name])
        return st._replace(u=u_new, v=v_new, dual=dual_new)

    new_state = jax.tree.map(update, opt_state, is_leaf=_is_ogd_state)
    if not found:
        raise ValueError(
            f"{where}: no ScaleByLoRAMuonOGDState in the optimizer state (built with "
            "lora_muon_ogd / scale_by_lora_muon_ogd?)"
        )
    return new_state


# ---------------------------------------------------------------- transforms


def scale_by_lora_muon_ogd(
    momentum: float | jax.Array = 0.9,
    *,
    num_bases: int,
    dual_steps: int = DEFAULT_DUAL_STEPS,
    dual_step_size: float | jax.Array = DEFAULT_DUAL_STEP_SIZE,
    warm_start: bool = True,
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
    num_bases = _check_int(name, "num_bases", num_bases, 0)
    dual_steps = _check_int(name, "dual_steps", dual_steps, 1)
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
            _Constraint(u[k], v[k], dual[k] if warm_start else jnp.zeros_like(dual[k]))
            for k in keys
        ]
        directions, new_duals, residuals = _ogd_directions(
            [view(p) for p in pairs],
            constraints,
            _stacked_units(method),
            dual_steps,
            dual_step_size,
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
