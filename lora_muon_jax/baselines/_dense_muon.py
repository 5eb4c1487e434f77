"""Dense Muon with LoRA-Muon's learning-rate convention (spectral-norm radius on W).

    M ← β M + (1 − β) G,      W ← (1 − λη) W − η msign(M)

``msign(M) = U Vᵀ`` for the thin SVD ``M = U Σ Vᵀ`` (``lora_muon_jax.matrix_sign``,
the paper's 8-step Newton–Schulz recipe). η is the spectral norm of the step on W:
there is no ``sqrt(fan_out/fan_in)`` shape factor and no bias correction, unlike
``optax.contrib.muon``. This is the baseline LoRA-Muon's η is calibrated against
(the paper's best η on TinyShakespeare is 0.1 for both).

Reference: Jordan et al., "Muon: An optimizer for hidden layers in neural
networks", 2024; Cesista, Crowson, Simal, Biderman, "LoRA-Muon: Spectral Steepest
Descent on the Low-Rank Manifold", arXiv:2606.12921, 2026 (the dense baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _base, _checks
from lora_muon_jax._polar import matrix_sign

F32 = jnp.float32
ema_momenta = _base.ema_momenta
increment = _base.increment

# (key path as strings, leaf) -> True if the leaf is a matrix Muon should step.
MatrixPredicate = Callable[[tuple[str, ...], Any], bool]


def default_is_matrix(path: tuple[str, ...], leaf: Any = None) -> bool:
    """Default rule: every leaf with at least 2 axes (leading axes are batch axes)."""
    if not isinstance(path, tuple):
        # optax.inject_hyperparams calls every callable not in static_args with the step.
        raise TypeError(
            f"default_is_matrix takes a leaf's key path and the leaf, got {path!r}; under "
            "optax.inject_hyperparams name it in static_args=('is_matrix',)"
        )
    return len(jnp.shape(leaf)) >= 2


class ScaleByDenseMuonState(NamedTuple):
    """State of ``scale_by_dense_muon``."""

    count: jax.Array  # int32[], number of updates so far
    mu: optax.Updates  # EMA of the gradients: params' tree and shapes, dtype mu_dtype


def scale_by_dense_muon(
    momentum: float | jax.Array = 0.9,
    *,
    nesterov: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""EMA momentum and its polar factor: ``D = msign(M)`` per matrix (no learning rate).

    ``M ← β M + (1 − β) G`` (Nesterov: ``D = msign(β M + (1 − β) G)``). Every
    leaf must have at least 2 axes; the last two are the matrix, leading axes
    are independent matrices. ``‖D‖₂ = 1``: scaling by ``-η`` gives a step of
    spectral norm η.

    Args:
      momentum: EMA rate β.
      nesterov: Nesterov momentum.
      mu_dtype: momentum dtype (default: the parameters'); math runs in float32.

    Returns:
      An ``optax.GradientTransformation``; ``update`` returns the gradients' dtypes.
    """
    _checks.check_static("scale_by_dense_muon", "momentum", momentum, "momentum")
    _checks.check_mu_dtype("scale_by_dense_muon", mu_dtype)

    def init_fn(params: optax.Params) -> ScaleByDenseMuonState:
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if len(jnp.shape(leaf)) < 2:
                raise ValueError(
                    f"scale_by_dense_muon: leaf {jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(leaf)}; Muon needs matrices (>= 2 axes). Use dense_muon(...) "
                    "(other leaves go to its fallback)."
                )
        return ScaleByDenseMuonState(
            count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype)
        )

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByDenseMuonState]:
        del params
        state = cast(ScaleByDenseMuonState, state)
        grads, treedef = jax.tree_util.tree_flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        mu32 = ema_momenta(mus, grads, momentum)
        mu_hat = ema_momenta(mu32, grads, momentum) if nesterov else mu32
        directions = jax.tree_util.tree_unflatten(
            treedef, [matrix_sign(m).astype(g.dtype) for m, g in zip(mu_hat, grads, strict=True)]
        )
        new_mu = jax.tree_util.tree_unflatten(
            treedef, [m.astype(old.dtype) for m, old in zip(mu32, mus, strict=True)]
        )
        return directions, ScaleByDenseMuonState(count=increment(state.count), mu=new_mu)

    return optax.GradientTransformation(init_fn, update_fn)  # type: ignore[arg-type]


class ScaleByDecoupledStepState(NamedTuple):
    """State of ``scale_by_decoupled_step``."""

    count: jax.Array  # int32[], step index for the learning-rate schedule


def scale_by_decoupled_step(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float | jax.Array = 0.01
) -> optax.GradientTransformationExtraArgs:
    """``update = -η D − λη W``: dense Muon's ``W ← (1 − λη) W − η D`` (needs params)."""
    return _base.scale_by_scaled_step(
        learning_rate,
        weight_decay,
        rule="decoupled",
        state_type=ScaleByDecoupledStepState,
        name="scale_by_decoupled_step",
    )


def dense_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | jax.Array = 0.9,
    nesterov: bool = False,
    weight_decay: float | jax.Array = 0.01,
    mu_dtype: Any = None,
    is_matrix: MatrixPredicate = default_is_matrix,
    fallback: optax.GradientTransformation | None = None,
    fallback_learning_rate: optax.ScalarOrSchedule | None = None,
    fallback_weight_decay: float | jax.Array = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Dense Muon, ``W ← (1 − λη) W − η msign(M)``, η a spectral-norm radius on W.

    The baseline of the LoRA-Muon paper: same momentum (EMA, β = 0.9, no
    Nesterov), same decoupled decay rate on W, and the same learning-rate
    units as ``lora_muon`` (no shape factor), so a learning rate tuned for one
    is directly comparable with the other.

    Args:
      learning_rate: η, a float or an optax schedule.
      momentum: EMA rate β.
      nesterov: Nesterov momentum.
      weight_decay: λ (decoupled, multiplied by η).
      mu_dtype: momentum dtype.
      is_matrix: ``f(path, leaf) -> bool`` choosing the leaves Muon steps
        (default: every leaf with >= 2 axes; leading axes are batch axes).
        Return False for embeddings and output heads to give them the fallback.
      fallback: transformation for the other leaves (default ``optax.adamw``).
      fallback_learning_rate: AdamW learning rate for the other leaves
        (default ``learning_rate``; its units differ — set it).
      fallback_weight_decay: AdamW weight decay for the other leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lora_muon_jax.baselines import dense_muon
      >>> params = {'w': jnp.eye(4), 'bias': jnp.zeros(4)}
      >>> opt = dense_muon(0.1, fallback_learning_rate=1e-3)
      >>> state = opt.init(params)
      >>> updates, state = opt.update({'w': jnp.eye(4), 'bias': jnp.ones(4)}, state, params)
      >>> round(float(jnp.linalg.norm(updates['w'] + 0.001 * params['w'], ord=2)), 3)
      0.1
    """
    matrix_tx = optax.chain(
        scale_by_dense_muon(momentum, nesterov=nesterov, mu_dtype=mu_dtype),
        scale_by_decoupled_step(learning_rate, weight_decay),
    )

    def labels(params: optax.Params) -> Any:
        def label(path: Any, leaf: Any) -> str:
            names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return "matrix" if is_matrix(names, leaf) and len(jnp.shape(leaf)) >= 2 else "fallback"

        return jax.tree_util.tree_map_with_path(label, params)

    return _base.fallback_partition(
        matrix_tx,
        labels,
        label="matrix",
        learning_rate=learning_rate,
        fallback=fallback,
        fallback_learning_rate=fallback_learning_rate,
        fallback_weight_decay=fallback_weight_decay,
        mu_dtype=mu_dtype,
    )
