"""Constraint bases for LoRA-Muon-OGD: from a finished task's ΔW, into an optimizer state.

``ogd_bases_from_delta`` computes each pair's top-k singular directions of
``ΔW = A Bᵀ − A₀ B₀ᵀ`` through tall products and 2r×2r work (never the m×n ΔW);
``update_ogd_bases`` appends them to (or replaces) the bases held by every
``ScaleByLoRAMuonOGDState`` in an optimizer state, re-orthonormalising the union.
Both run eagerly, between tasks (host-side k×k eigh).

Reference: F. L. Cesista, "LoRA-Muon-OGD", blog post, 2026-06-25
(leloykun.github.io/ponder/lora-muon-ogd).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import _checks, _pairs, _polar
from lora_muon_jax._ogd_direction import project
from lora_muon_jax._pairs import DimensionNumbersArg, PairRule

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
      params_now: the parameters after the task: the same tree the optimizer
        was initialised on (pair names must match its state's); leaves that
        are not LoRA factors are ignored.
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
    num_bases = _checks.check_int(where, "num_bases", num_bases, 1)
    _checks.check_grads_match_params(where, params_start, params_now)
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule
    pairs = _pairs.resolve_pairs(params_now, rule, dimension_numbers).pairs
    _checks.check_pair_sizes(where, params_now, pairs)
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
        core = _polar._mm(project(q_p, big_p, False), _polar._mT(project(q_q, big_q, False)))
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
