"""LoRA-Muon-OGD's direction as pure array math (no optax): J primal–dual steps.

For a pair ``A (m×r)``, ``B (n×r)``, momenta ``M_A``, ``M_B``, bases ``U (m×k)``,
``V (n×k)`` and a warm start ``Λ̃ (k×k)``, each of J steps takes LoRA-Muon's unit
direction ``D = msign(M' R) R`` of the shifted momenta
``M_A' = M_A + U Λ̃ (VᵀB)``, ``M_B' = M_B + V Λ̃ᵀ (UᵀA)`` and then the dual step
``Λ̃ ← Λ̃ + σ ν ρ`` with ``ρ = Uᵀ ΔW V / η = −½ [(Uᵀ D_A)(VᵀB)ᵀ + (UᵀA)(Vᵀ D_B)ᵀ]``
and ``ν = (⟨M_A, D_A⟩ + ⟨M_B, D_B⟩) / 2r``. See ``_lora_muon_ogd`` and
docs/lora_muon_ogd.md for the derivation.

Reference: F. L. Cesista, "LoRA-Muon-OGD", blog post, 2026-06-25
(leloykun.github.io/ponder/lora-muon-ogd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _checks, _direction, _polar
from lora_muon_jax._direction import FactorPair, Method

_HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32

# ---------------------------------------------------------------- constants
# Default dual steps per optimizer step and dimensionless dual step size σ.
# Measured (docs/lora_muon_ogd.md): within one step, from Λ = 0, the residual
# ‖UᵀΔWV‖ contracts geometrically for σ ≲ 1 (σ = 0.5: ×0.55–0.8 per dual step)
# when the shifted momenta are well conditioned; in training, where Λ is
# warm-started over hundreds of steps and the momenta are rank-deficient
# (the dual is nonsmooth there), σ = 0.003–0.01 protected past tasks best; the
# post's last iterate did worse than no constraint at σ ≥ 0.05, the mean of the
# iterates (primal_average, the default) was flat from 0.003 to 0.05
# (experiments/continual.py).
DEFAULT_DUAL_STEPS = 2
DEFAULT_DUAL_STEP_SIZE = 0.01
# Up to this many dual steps are unrolled; more run in a lax.scan (one copy of the
# direction in the program, so compile time does not grow with J). Measured on CPU
# (1024×1024, r = k = 16, a loaded 2-core machine): unrolled J = 2 costs about 2
# LoRA-Muon directions, the scan about 4 (XLA does not fuse across the loop).
UNROLL_MAX_DUAL_STEPS = 4


# ---------------------------------------------------------------- private helpers


def project(basis: jax.Array, x: jax.Array, rank_first: bool) -> jax.Array:
    """``basisᵀ X`` (N, k, r) for ``X`` as an (N, m, r) view or its (N, r, m) rank-first form.

    A sharded tall axis of X becomes partial sums and a k×r all-reduce (the basis is
    replicated; on explicit meshes the k×r result is, too): X is never gathered.
    """
    spec = "Nmk,Nrm->Nkr" if rank_first else "Nmk,Nmr->Nkr"
    sharding = _polar.explicit_sharding(x)
    if sharding is not None:  # the basis's m axis split like X's (a local slice of it)
        x_spec = _polar.padded_spec(sharding, x.ndim)
        m_spec = x_spec[-1] if rank_first else x_spec[-2]
        basis = jax.sharding.reshard(
            basis,
            jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec(*x_spec[:-2], m_spec, None)
            ),
        )
    return jnp.einsum(spec, basis, x, precision=_HIGHEST, out_sharding=_polar._gram_out_sharding(x))


def _expand(basis: jax.Array, c: jax.Array, rank_first: bool, like: jax.Array) -> jax.Array:
    """``basis C`` for ``C (N, k, r)``, in the view's orientation, laid out like ``like``.

    With a replicated basis each device computes its own rows of the result: on an
    explicit mesh its sharding is that of ``like`` (the momentum it is added to).
    """
    spec = "Nmk,Nkr->Nrm" if rank_first else "Nmk,Nkr->Nmr"
    return jnp.einsum(
        spec, basis, c, precision=_HIGHEST, out_sharding=_polar.explicit_sharding(like)
    )


def _inner(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(x * y, axis=(-2, -1))


class Constraint(NamedTuple):
    u: jax.Array  # (N, m, k)
    v: jax.Array  # (N, n, k)
    dual: jax.Array  # (N, k, k)


def ogd_directions(
    views: Sequence[FactorPair],
    constraints: Sequence[Constraint],
    unit_directions: Callable[[list[FactorPair]], list[tuple[jax.Array, ...]]],
    dual_steps: int,
    dual_step_size: float | jax.Array,
    primal_average: bool = True,
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array], list[jax.Array]]:
    """Unit OGD directions of many pairs: J primal (LoRA-Muon) solves with dual ascent between.

    ``unit_directions`` maps shifted views to LoRA-Muon unit directions
    ``msign(M R) R`` (batched across pairs). Returns the mean of the J
    primal iterates (``primal_average``; else the last one), the updated
    duals Λ̃ and the unit residuals ``‖Uᵀ ΔW V‖_F / η`` of the returned step.
    """
    prepared = []
    for p, c in zip(views, constraints, strict=True):
        dt = _polar.compute_dtype(p.a.dtype, p.b.dtype, p.mu_a.dtype, p.mu_b.dtype)
        u, v, dual = c.u.astype(dt), c.v.astype(dt), c.dual.astype(dt)
        a, b = p.a.astype(dt), p.b.astype(dt)
        ua = project(u, a, p.a_rank_first)  # UᵀA (N, k, r)
        vb = project(v, b, p.b_rank_first)  # VᵀB (N, k, r)
        prepared.append((dt, u, v, dual, a, b, ua, vb))

    sigma = jnp.asarray(dual_step_size, F32)

    def one_step(duals: list[jax.Array]) -> tuple[list[Any], list[jax.Array], list[jax.Array]]:
        shifted = []
        for p, (dt, u, v, _, a, b, ua, vb), dual in zip(views, prepared, duals, strict=True):
            # G_W + U Λ Vᵀ:  M_A + U Λ̃ (VᵀB),  M_B + V Λ̃ᵀ (UᵀA).
            mu_a = p.mu_a.astype(dt) + _expand(u, _polar._mm(dual, vb), p.a_rank_first, p.mu_a)
            mu_b = p.mu_b.astype(dt) + _expand(
                v, _polar._mm(_polar._mT(dual), ua), p.b_rank_first, p.mu_b
            )
            shifted.append(FactorPair(a, b, mu_a, mu_b, p.a_rank_first, p.b_rank_first))
        units = unit_directions(shifted)
        directions, residuals, new_duals = [], [], []
        for p, (dt, u, v, _, _a, _b, ua, vb), dual, (d_a, d_b) in zip(
            views, prepared, duals, units, strict=True
        ):
            d_a, d_b = d_a.astype(dt), d_b.astype(dt)
            directions.append((d_a, d_b))
            # Uᵀ ΔW V / η = −½ [(Uᵀ D_A)(VᵀB)ᵀ + (UᵀA)(Vᵀ D_B)ᵀ]   (the α's cancel).
            ud = project(u, d_a, p.a_rank_first)
            vd = project(v, d_b, p.b_rank_first)
            rho = -0.5 * (_polar._mm(ud, _polar._mT(vb)) + _polar._mm(ua, _polar._mT(vd)))
            r = p.a.shape[-2] if p.a_rank_first else p.a.shape[-1]
            # ν = (⟨M_A, D_A⟩ + ⟨M_B, D_B⟩) / 2r with the *unshifted* momenta: the
            # first-order gain of the step per unit of η/2 (at Λ = 0 the mean singular
            # value of the whitened momenta), so a growing Λ cannot feed back into ν.
            gain = _inner(p.mu_a.astype(dt), d_a) + _inner(p.mu_b.astype(dt), d_b)
            nu = jnp.maximum(gain, 0.0) / (2.0 * r)
            new = dual + sigma.astype(dt) * nu[..., None, None] * rho
            new_duals.append(jnp.where(jnp.isfinite(new), new, dual))
            residuals.append(rho)
        return directions, new_duals, residuals

    def norms(rhos: list[jax.Array]) -> list[jax.Array]:
        return [jnp.sqrt(jnp.sum(rho * rho, axis=(-2, -1))) for rho in rhos]

    duals = [item[3] for item in prepared]
    if dual_steps == 1 or not primal_average:
        if dual_steps <= UNROLL_MAX_DUAL_STEPS:
            for _ in range(dual_steps):
                directions, duals, rhos = one_step(duals)
            return directions, duals, norms(rhos)

        # A scan keeps one copy of the direction in the program whatever J is.
        def body(carry: Any, _: None) -> tuple[Any, None]:
            return one_step(carry[1]), None

        shapes = jax.eval_shape(one_step, duals)
        init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        init = (init[0], duals, init[2])
        (directions, duals, rhos), _ = jax.lax.scan(body, init, None, length=dual_steps)
        return directions, duals, norms(rhos)

    # Primal averaging: the mean of the J iterates (inside each half's trust region,
    # which is convex); its residual is the mean of theirs (ρ is linear in the step).
    def accumulate(carry: Any, _: None = None) -> tuple[Any, None]:
        sums, duals, rho_sums = carry
        directions, duals, rhos = one_step(duals)
        sums = jax.tree.map(jnp.add, sums, directions)
        return (sums, duals, [x + y for x, y in zip(rho_sums, rhos, strict=True)]), None

    shapes = jax.eval_shape(one_step, duals)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    carry = (zeros[0], duals, zeros[2])
    if dual_steps <= UNROLL_MAX_DUAL_STEPS:
        for _ in range(dual_steps):
            carry, _ = accumulate(carry)
    else:
        carry, _ = jax.lax.scan(accumulate, carry, None, length=dual_steps)
    sums, duals, rho_sums = carry
    scale = 1.0 / dual_steps
    directions = [(d_a * scale, d_b * scale) for d_a, d_b in sums]
    return directions, duals, norms([rho * scale for rho in rho_sums])


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
    primal_average: bool = True,
    method: Method = "gram",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Unit LoRA-Muon-OGD direction of one factor pair (math layout, batched).

    With ``Λ̃⁽⁰⁾ = dual`` (zeros if ``None``), for ``j = 1 … dual_steps``:
    ``U_A = msign((M_A + U Λ̃ VᵀB) R_B) R_B``,
    ``U_B = msign((M_B + V Λ̃ᵀ UᵀA) R_A) R_A``, then
    ``Λ̃ ← Λ̃ + σ ν ρ`` with ``ρ = −½ Uᵀ(U_A Bᵀ + A U_Bᵀ)V`` (the residual of
    the step ``ΔA = −(η/2) U_A``, ``ΔB = −(η/2) U_B`` in units of η) and ν the
    step's first-order gain on the unshifted momenta (over 2r). Returned: the
    mean of the J iterates (``primal_average``, the standard remedy for dual
    ascent on a nonsmooth dual) or the last one. Each iterate has
    ``‖U_A Bᵀ‖₂ = ‖A U_Bᵀ‖₂ = 1`` (LoRA-Muon's trust region), so their mean
    has at most 1.

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
      primal_average: return the mean of the J primal iterates (default) or
        the last one.
      method: ``"gram"`` or ``"paper"`` (LoRA-Muon's ``METHODS``).

    Returns:
      ``(U_A, U_B, dual, residual)``: the unit directions, mean or last
      (shapes of ``a``, ``b``), the updated Λ̃ (..., k, k) and the unit
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
    dual_steps = _checks.check_int(where, "dual_steps", dual_steps, 1)
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
    constraint = Constraint(u.reshape((-1, *u.shape[-2:])), v.reshape((-1, *v.shape[-2:])), dual0)
    (dirs,), (new_dual,), (res,) = ogd_directions(
        [view],
        [constraint],
        lambda views: _direction.lora_muon_directions(views, method),
        dual_steps,
        dual_step_size,
        primal_average,
    )
    return (
        dirs[0].reshape(a.shape),
        dirs[1].reshape(b.shape),
        new_dual.reshape((*batch, k, k)),
        res.reshape(batch),
    )
