"""Per-pair numerical health of LoRA factors and of a step, to log during training.

Ill-conditioned factors or momenta are where a LoRA optimizer's numerics are
tested (``lora_muon`` switches to its robust form there, see
``lora_muon_jax._direction``); these numbers make that visible::

    diag = pair_diagnostics(params, updates)
    for name, d in diag.items():
        print(name, float(d.cond_a.max()), float(d.balance.max()), float(d.step_stable_rank.min()))

Everything is computed from r×r (2r×2r for the step) Grams of the tall
factors with ``eigh`` in float32 (float64 for float64 factors): cheap, exact to
float32 rounding, and not part of any optimizer step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _pairs, _polar
from lora_muon_jax._pairs import DimensionNumbersArg, PairRule


class PairDiagnostics(NamedTuple):
    """One pair's numbers; each field has the pair's batch shape (``()`` for a plain pair).

    Attributes:
      cond_a: ``κ(A) = σ_max(A) / σ_min(A)``; ``inf`` for a rank-deficient or zero A.
      cond_b: ``κ(B)``, the same for ``B = lora_bᵀ``.
      balance: ``‖A‖₂ / ‖B‖₂`` (1 after ``rebalance=True``); ``inf``/``0`` if one is zero.
      step_stable_rank: ``‖ΔW‖_F² / ‖ΔW‖₂²`` of the first-order step
        ``ΔW = ΔA Bᵀ + A ΔBᵀ`` (between 1 and 2r; LoRA-Muon's full-rank
        steps sit near 2r, a collapsing step near 1); ``nan`` without ``updates``
        or for a zero step.
    """

    cond_a: jax.Array
    cond_b: jax.Array
    balance: jax.Array
    step_stable_rank: jax.Array


def _eigvalsh(g: jax.Array) -> jax.Array:
    return jnp.linalg.eigvalsh(_polar._sym(g))


def _cond(s: jax.Array) -> jax.Array:
    w = _eigvalsh(s)
    lo, hi = w[..., 0], w[..., -1]
    return jnp.where(lo > 0, jnp.sqrt(hi / jnp.where(lo > 0, lo, 1.0)), jnp.inf)


def _spectral_sq(s: jax.Array) -> jax.Array:
    return jnp.maximum(_eigvalsh(s)[..., -1], 0.0)


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _step_stable_rank(a, b, da, db) -> jax.Array:  # type: ignore[no-untyped-def]
    # ΔW = X Yᵀ with X = [ΔA, A] (m×2r), Y = [B, ΔB] (n×2r): from 2r×2r Grams.
    x = jnp.concatenate([da, a], axis=-1)
    y = jnp.concatenate([b, db], axis=-1)
    gx, gy = _polar.gram(x), _polar.gram(y)
    frob_sq = jnp.einsum("...ij,...ji->...", gx, gy)
    wx, vx = jnp.linalg.eigh(_polar._sym(gx))
    root = _mm(vx * jnp.sqrt(jnp.maximum(wx, 0.0))[..., None, :], jnp.swapaxes(vx, -1, -2))
    spec_sq = _spectral_sq(_mm(root, _mm(gy, root)))
    return jnp.where(spec_sq > 0, frob_sq / jnp.where(spec_sq > 0, spec_sq, 1.0), jnp.nan)


def pair_diagnostics(
    params: Any,
    updates: Any = None,
    *,
    pair_rule: PairRule = _pairs.default_pair_rule,
    dimension_numbers: DimensionNumbersArg = None,
) -> dict[str, PairDiagnostics]:
    """Condition numbers, balance and step stable rank of every LoRA pair in ``params``.

    Args:
      params: a parameter tree (or ``nnx.State``); its LoRA pairs are found as
        ``lora_muon`` finds them (``find_lora_pairs``).
      updates: optional updates with the params' structure (what ``opt.update``
        returned); they give ``step_stable_rank``. Leaves outside pairs are ignored.
      pair_rule: as in ``lora_muon``.
      dimension_numbers: as in ``lora_muon``.

    Returns:
      ``{pair name: PairDiagnostics}``; jit-compatible.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax.diagnostics import pair_diagnostics
      >>> params = {"lora_a": jnp.diag(jnp.array([4.0, 1.0])), "lora_b": jnp.eye(2)}
      >>> d = pair_diagnostics(params)["['lora_{a,b}']"]
      >>> float(d.cond_a), float(d.balance)
      (4.0, 4.0)
    """
    pairs = _pairs.find_lora_pairs(params, pair_rule=pair_rule, dimension_numbers=dimension_numbers)
    leaves = jax.tree_util.tree_leaves(params)
    steps = None if updates is None else jax.tree_util.tree_leaves(updates)
    out = {}
    for p in pairs:
        dtype = _polar.compute_dtype(leaves[p.a_index].dtype, leaves[p.b_index].dtype)
        batch = p.batch_shape  # the batch axes may sit anywhere (MaxText: inside both factors)

        def math(x: jax.Array, role: _pairs.Role, p: _pairs.LoRAPair = p, dt=dtype) -> jax.Array:
            return _pairs.to_math_layout(jnp.asarray(x).astype(dt), p, role)

        a, b = math(leaves[p.a_index], "a"), math(leaves[p.b_index], "b")
        s_a, s_b = _polar.gram(a), _polar.gram(b)
        norm_a, norm_b = jnp.sqrt(_spectral_sq(s_a)), jnp.sqrt(_spectral_sq(s_b))
        balance = jnp.where(norm_b > 0, norm_a / jnp.where(norm_b > 0, norm_b, 1.0), jnp.inf)
        if steps is None:
            rank = jnp.full(a.shape[:1], jnp.nan, dtype)
        else:
            da, db = math(steps[p.a_index], "a"), math(steps[p.b_index], "b")
            rank = _step_stable_rank(a, b, da, db)
        out[p.name] = PairDiagnostics(
            *(v.reshape(batch) for v in (_cond(s_a), _cond(s_b), balance, rank))
        )
    return out
