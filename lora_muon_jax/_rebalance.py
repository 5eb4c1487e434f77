r"""Gauge rebalancing of LoRA factors (the paper's Algorithm 2).

A pair ``W = α A Bᵀ`` is unchanged by ``(A, B) → (c A, B / c)`` for any c > 0,
and so is the LoRA-Muon step (gauge invariance). Rebalancing picks

    c = √(‖B‖₂ / ‖A‖₂)   so that   ‖c A‖₂ = ‖B / c‖₂ = √(‖A‖₂ ‖B‖₂),

and rescales the momenta with the gradients they average (``G_A = G_W B``
scales as 1/c, ``G_B = G_Wᵀ A`` as c): ``M_A → M_A / c``, ``M_B → c M_B``. The
product, the step and the whole trajectory of W stay the same; only the
factors' floating-point scales are kept tidy (useful for AdamW-style
fallbacks, mixed precision and checkpoints that are read by other tools).

Spectral norms come from r×r Grams by repeated squaring (matmuls only). Any
c > 0 is a valid gauge, so the norms need only be accurate enough to
balance; a zero factor (``lora_b = 0`` at init) leaves the pair as it is.

The rescaling travels as an additive update (``A + u`` with ``u = c (A + u_A) − A``),
and shrinking a factor by c that way costs about ``log2(1/c)`` of its bits: the
sum rounds at ``ε |A|``, i.e. ``ε/c`` relative to ``c A``. So each step's c is
clipped to ``[√ε, 1/√ε]`` (ε of the factors' dtype; float32: ``[3.5e-4, 2.9e3]``):
a pair is balanced in one step unless ``‖A‖₂/‖B‖₂`` is beyond ``1/ε`` (float32:
8e6), and otherwise in a few, and no step loses more than half of the shrunk
factor's digits. (Unclipped, factors ``1e10`` apart in float32 gave a step of W
7.6× off the exact one; found by tests/test_properties.py.)
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _pairs, _polar
from lora_muon_jax._pairs import DimensionNumbersArg, PairRule

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# P ← (P/‖P‖_F)² k times weights eigenvalue λ by (λ/λ_max)^(2^k): with k = 10
# each eigenvalue biases the Rayleigh quotient below by at most 1/(e·2^k) = 3.6e-4.
_SQUARINGS = 10


def log_spectral_norm(x: jax.Array, *, rank_first: bool = False) -> jax.Array:
    r"""``log ‖x‖₂`` of each (..., m, r) matrix (``rank_first``: (..., r, m)), float32.

    Computed as ``log max|x| + ½ log λ_max(x̂ᵀx̂)`` with ``x̂ = x / max|x|`` so
    that neither tiny nor huge factors under- or overflow; λ_max of the r×r
    Gram ``S`` is ``tr(S P) / tr(P)`` with ``P ∝ S^(2^k)`` built by repeated
    normalised squaring. A zero matrix gives ``-inf``.
    """
    x = x.astype(_F32)
    peak = jnp.max(jnp.abs(x), axis=(-2, -1))
    safe_peak = jnp.where(peak > 0, peak, 1.0)
    s = _polar.gram(x / safe_peak[..., None, None], rank_first=rank_first)
    p = s
    for _ in range(_SQUARINGS):
        p = p / jnp.maximum(jnp.linalg.norm(p, axis=(-2, -1)), _polar._TINY)[..., None, None]
        p = jnp.matmul(p, p, precision=_HIGHEST)
    trace_p = jnp.trace(p, axis1=-2, axis2=-1)
    trace_sp = jnp.einsum("...ij,...ji->...", s, p, precision=_HIGHEST)
    lam = trace_sp / jnp.where(trace_p > 0, trace_p, 1.0)
    log_norm = jnp.log(safe_peak) + 0.5 * jnp.log(jnp.maximum(lam, _polar._TINY))
    return jnp.where(peak > 0, log_norm, -jnp.inf)


def max_log_gauge(dtype: Any) -> float:
    """``log(1/√ε)`` of ``dtype``: the largest |log c| one additive step can apply.

    Shrinking a factor by c through ``A + (cA − A)`` rounds at ``ε|A|``, ``ε/c``
    relative to the result: with ``c >= √ε`` at most half of its digits are lost.
    """
    return -0.5 * math.log(float(jnp.finfo(dtype).eps))


def balancing_gauge(
    a: jax.Array,
    b: jax.Array,
    *,
    a_rank_first: bool = False,
    b_rank_first: bool = False,
    dtype: Any = None,
) -> jax.Array:
    """c = √(‖B‖₂/‖A‖₂) per batch element (float32); 1 where a factor is zero.

    With ``dtype`` (the factors' storage dtype) c is clipped to
    ``[√ε, 1/√ε]`` of that dtype (``max_log_gauge``).
    """
    log_a = log_spectral_norm(a, rank_first=a_rank_first)
    log_b = log_spectral_norm(b, rank_first=b_rank_first)
    log_c = 0.5 * (log_b - log_a)
    if dtype is not None:
        bound = max_log_gauge(dtype)
        log_c = jnp.clip(log_c, -bound, bound)
    return jnp.where(jnp.isfinite(log_c), jnp.exp(log_c), 1.0)


def _scale(x: jax.Array, pair: _pairs.LoRAPair, role: _pairs.Role, k: jax.Array) -> jax.Array:
    """``x`` (a factor of ``pair`` in its own layout) times ``k[batch]``, float32."""
    view, _ = _pairs.to_matrix_view(x.astype(_F32), pair, role)
    return _pairs.from_matrix_view(view * k[:, None, None], pair, role)


def _moved(factors: list[jax.Array], steps: list[jax.Array], index: int) -> jax.Array:
    return factors[index].astype(_F32) + steps[index].astype(_F32)


def with_gauge_rebalancing(
    tx: optax.GradientTransformation,
    *,
    pair_rule: PairRule | None = None,
    dimension_numbers: DimensionNumbersArg = None,
) -> optax.GradientTransformationExtraArgs:
    """Rebalance every pair after ``tx``'s step (the paper's Algorithm 2), composably.

    ``tx`` is any transformation whose state holds the factor momenta as a field
    named ``mu`` with the params' structure — ``scale_by_lora_muon`` (alone or
    chained with ``scale_by_split_weight_decay``, clipping, schedules, ...) or
    any other ``scale_by_pair_direction`` optimizer. The momenta are found and
    replaced with ``optax.tree_utils.tree_get`` / ``tree_set``, not by position.
    The returned update moves each factor to ``c (A + u_A)``, i.e. it is
    ``c u_A + (c − 1) A``; the state keeps the momenta rescaled with the factors
    (``M_A / c``, ``c M_B``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lora_muon_jax import scale_by_lora_muon, scale_by_split_weight_decay
      >>> from lora_muon_jax import with_gauge_rebalancing
      >>> tx = with_gauge_rebalancing(
      ...     optax.chain(scale_by_lora_muon(), scale_by_split_weight_decay(0.1)))
      >>> params = {'lora_a': 100.0 * jnp.eye(4, 2), 'lora_b': 0.01 * jnp.eye(2, 3)}
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> a, b = (float(jnp.linalg.norm(new[k], ord=2)) for k in ('lora_a', 'lora_b'))
      >>> round(a / b, 4)  # 1e4 apart: within 1/ε of float32, balanced in one step
      1.0
    """
    tx = optax.with_extra_args_support(tx)
    rule = pair_rule if pair_rule is not None else _pairs.default_pair_rule

    def init_fn(params: optax.Params) -> Any:
        state = tx.init(params)
        _momenta(state)  # fail early if there are none
        return state

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        new_updates, new_state = tx.update(updates, state, params, **extra_args)
        if not jax.tree_util.tree_leaves(new_updates) or params is None:
            return new_updates, new_state
        pairs = _pairs.resolve_pairs(new_updates, rule, dimension_numbers).pairs
        steps, treedef = jax.tree_util.tree_flatten(new_updates)
        factors = treedef.flatten_up_to(params)
        mus = treedef.flatten_up_to(_momenta(new_state))
        out, new_mus = list(steps), list(mus)
        with jax.named_scope("gauge_rebalancing"):
            for p in pairs:
                a, a_rank_first = _pairs.to_matrix_view(_moved(factors, steps, p.a_index), p, "a")
                b, b_rank_first = _pairs.to_matrix_view(_moved(factors, steps, p.b_index), p, "b")
                # The coarser of the two storage dtypes bounds the rescaling (clip).
                eps_dtype = max(
                    (factors[p.a_index].dtype, factors[p.b_index].dtype),
                    key=lambda d: float(jnp.finfo(d).eps),
                )
                c = balancing_gauge(
                    a, b, a_rank_first=a_rank_first, b_rank_first=b_rank_first, dtype=eps_dtype
                )
                roles: tuple[tuple[_pairs.Role, int, jax.Array, jax.Array], ...] = (
                    ("a", p.a_index, c, 1.0 / c),
                    ("b", p.b_index, 1.0 / c, c),
                )
                for role, index, factor_scale, mu_scale in roles:
                    param, step = factors[index].astype(_F32), steps[index].astype(_F32)
                    # c (A + u) − A, written without cancellation.
                    moved = _scale(step, p, role, factor_scale) + _scale(
                        param, p, role, factor_scale - 1.0
                    )
                    out[index] = moved.astype(factors[index].dtype)
                    new_mus[index] = _scale(mus[index], p, role, mu_scale).astype(mus[index].dtype)
        new_mu_tree = jax.tree_util.tree_unflatten(treedef, new_mus)
        new_state = optax.tree_utils.tree_set(new_state, mu=new_mu_tree)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _momenta(state: Any) -> Any:
    try:
        mu = optax.tree_utils.tree_get(state, "mu")
    except KeyError as error:
        raise ValueError(
            "with_gauge_rebalancing: the wrapped transformation's state has several fields "
            "named `mu`; rebalancing needs exactly one (the factor momenta)"
        ) from error
    if mu is None:
        raise ValueError(
            "with_gauge_rebalancing: the wrapped transformation keeps no factor momenta (no "
            "state field named `mu`); wrap scale_by_lora_muon(...) or a chain containing it"
        )
    return mu
